import sys

from metaprune.cli.main import main

sys.exit(main())
