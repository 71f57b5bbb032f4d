import sys
from pathlib import Path

# scripts/localcouch.py is shared by the demo and the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
