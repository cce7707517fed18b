"""`python -m nla <command>`: the same CLI as `nla`, for launchers that take a module (torchrun -m)."""

import sys

from nla.cli import main

sys.exit(main())
