"""``python -m ffm_hub.experiments SPEC ...``: the same as ``ffm-hub experiment``."""

import sys

from ffm_hub.experiments.cli import main

sys.exit(main())
