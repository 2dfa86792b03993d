"""``python -m ravl_pipeline.cli`` (and ``torchrun -m ravl_pipeline.cli finetune …``) = ``ravl``."""
import sys

from . import main

sys.exit(main())
