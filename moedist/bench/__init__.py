"""`moedist bench`: measure the MoE layer, expert parallelism and training against peers.

    layer.py   one layer vs DeepSpeed native MoE, fairscale, a dense FFN and the matmul floor
    ep.py      the expert-parallel layer under torchrun (all-to-all time and bytes, imbalance)
    train.py   end-to-end tokens/s of the tiny model vs the same model on DeepSpeed's MoE
    peers.py   every DeepSpeed / fairscale internal the benchmarks touch
    timing.py  CPU wall clock / CUDA events, interleaved runs, TFLOP/s and GPU peak table
    memory.py  peak memory: tracked allocations on CPU, max_memory_allocated on CUDA
    plot.py    PNG plots of the ratios and the sweeps
    cli.py     argument parsing; `main(argv)` is what `moedist bench ...` calls
"""
