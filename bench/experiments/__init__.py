"""Investigations behind figures in ``bench/RESULTS.md``, each a script run as ``python -m bench.experiments.<name>``:

- ``distributed``: the distributed wrapper on 2 gloo processes and cross-batch memory, against PML;
- ``faults``: page faults and time per call with the blocked path's workspace kept or released;
- ``idle``: what slows a short call that follows other work;
- ``native``: the batch-hard step with and without the compiled CPU helpers;
- ``spread``: the spread of a headline ratio over many alternating rounds in fresh processes.

None of them is part of ``make bench``; their findings are recorded in ``bench/RESULTS.md``.
"""
