#!/usr/bin/env bash
# Lints the protos with buf (STANDARD rules, see buf.yaml), checks their formatting, and builds them.
# buf comes from npm, pinned, without a global install: npx keeps it in its cache (~/.npm/_npx).
# Breaking-change check against main:  (cd protos && npx --yes @bufbuild/buf@1.75.0 breaking --against '../.git#branch=main,subdir=protos')
set -euo pipefail
cd "$(dirname "$0")"
export npm_config_loglevel=error
local_buf=../clients/node/node_modules/.bin/buf  # the same pinned version, from `npm ci --prefix clients/node`
if [ -x "$local_buf" ]; then
    buf() { "$local_buf" "$@"; }
else
    buf() { npx --yes "@bufbuild/buf@1.75.0" "$@"; }
fi
buf lint
buf format --diff --exit-code
buf build -o /dev/null
echo "buf lint, format and build: OK"
