import sys
from pathlib import Path

# Let tests import helper modules that live next to them (tiny_checkpoints.py).
sys.path.insert(0, str(Path(__file__).parent))
