"""``python -m skyfm.pretrain ...`` is ``skyfm pretrain ...``; the form ``accelerate launch -m`` wants."""

import sys

from skyfm.cli import main

sys.exit(main(["pretrain", *sys.argv[1:]]))
