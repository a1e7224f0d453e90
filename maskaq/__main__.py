"""`python -m maskaq` is the `maskaq` command."""
import sys

from maskaq.cli import main

sys.exit(main())
