"""``python -m runtime.backends.genai``: the engine process (see ``engine_process.py``)."""
import sys

from .engine_process import main

sys.exit(main())
