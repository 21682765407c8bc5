import sys

from otprune.cli import main

sys.exit(main())
