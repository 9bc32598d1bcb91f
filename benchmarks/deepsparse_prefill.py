#!/usr/bin/env python
"""Prefill tokens/s of an ONNX prefill graph in DeepSparse, run by benchmarks/speed.py inside
DeepSparse's own venv (deepsparse 1.8.0 needs Python <= 3.11 and onnx < 1.15, which the project's
venv cannot hold):

    python3.11 -m venv /tmp/dsvenv && /tmp/dsvenv/bin/pip install deepsparse==1.8.0 'onnx<1.15'
    /tmp/dsvenv/bin/python benchmarks/deepsparse_prefill.py GRAPH.onnx --lengths 128 512 --threads 2

Prints one JSON object: {"prefill_128": tokens/s, ...}. Only the prefill graph: DeepSparse's
KV-cache generation needs graphs laid out by SparseML's exporter, which ours is not.
"""

import argparse
import json
import statistics
import time

import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("graph")
    p.add_argument("--lengths", nargs="+", type=int, default=[128, 512])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from deepsparse import compile_model

    out = {}
    for n in args.lengths:
        engine = compile_model(args.graph, batch_size=1, num_cores=args.threads, input_shapes=[[1, n], [1, n]])
        inputs = [np.random.default_rng(0).integers(0, 1000, (1, n), dtype=np.int64), np.ones((1, n), dtype=np.int64)]
        engine.run(inputs)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            engine.run(inputs)
            times.append(time.perf_counter() - start)
        out[f"prefill_{n}"] = n / statistics.median(times)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
