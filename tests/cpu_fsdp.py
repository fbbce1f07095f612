"""`python tests/cpu_fsdp.py ARGS` = `vf-sft ARGS` (`cpu_fsdp.py rl ARGS`: `vf-rl ARGS`) with FSDP allowed on CPU
processes (gloo), for the tests.

accelerate applies FSDP only on accelerators and otherwise falls back to DDP (vftrain then stops with an error);
torch's FSDP2 itself runs on CPU. This shim marks the CPU process group as FSDP the way accelerate marks a GPU
one (accelerate/state.py, AcceleratorState.__init__), so the sharded code path runs in CI without a GPU.
"""

from __future__ import annotations

import sys

import accelerate.state as state

_init = state.AcceleratorState.__init__


def _init_allowing_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    # Every AcceleratorState() re-reads the process group's type, so the mark is re-applied on each call.
    plugin = fsdp_plugin or self.__dict__.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == state.DistributedType.MULTI_CPU:
        self.distributed_type = state.DistributedType.FSDP
        if fsdp_plugin is not None and self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = plugin


state.AcceleratorState.__init__ = _init_allowing_cpu_fsdp

if __name__ == "__main__":
    import logging
    import os

    if sys.argv[1:2] == ["rl"]:
        from vftrain.cli.rl import main

        code = main(sys.argv[2:])
    else:
        from vftrain.cli.sft import main

        code = main(sys.argv[1:])
    # After a finished run, the interpreter's own teardown aborted a CPU FSDP2 process once in about seven suite
    # runs ("terminate called without an active exception", SIGABRT, after the process group was destroyed): a gloo
    # thread outliving it. GPU runs use NCCL, not this shim; leave without the teardown, everything flushed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
