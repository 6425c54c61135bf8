#!/usr/bin/env python
"""See `python tools/convert_hf_to_megatron.py --help` (mopd_megatron.convert.cli)."""
import sys

from mopd_megatron.convert.cli import hf_to_megatron_main

if __name__ == "__main__":  # the guard matters: checkpoint I/O may re-import this module
    sys.exit(hf_to_megatron_main())
