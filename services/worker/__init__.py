"""The generated tessera.worker.v1 gRPC stubs only; the worker role itself lives in services/engine/."""
