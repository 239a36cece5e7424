import sys

from mmtok.cli.main import main

sys.exit(main())
