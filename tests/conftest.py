import sys
from pathlib import Path

# Lets tests import the shared builders in tests/helpers.py.
sys.path.insert(0, str(Path(__file__).resolve().parent))
