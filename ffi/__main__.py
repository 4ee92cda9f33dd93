"""`python -m ffi`: build every FFI library this machine has a compiler for, and print where it went."""

import sys

from ffi.build import main

sys.exit(main())
