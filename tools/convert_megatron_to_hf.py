#!/usr/bin/env python
"""See `python tools/convert_megatron_to_hf.py --help` (mopd_megatron.convert.cli)."""
import sys

from mopd_megatron.convert.cli import megatron_to_hf_main

if __name__ == "__main__":  # the guard matters: checkpoint I/O may re-import this module
    sys.exit(megatron_to_hf_main())
