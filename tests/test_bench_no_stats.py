"""`moedist bench layer --no-stats`: the flag reaches every moedist MoELayer (stats=False: no router
entropy, no dropped fraction), and the default keeps the statistics."""
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from moedist.bench.cases import build_cases  # noqa: E402
from moedist.bench.cli import build_parser  # noqa: E402
from moedist.bench.layer import LayerBenchConfig  # noqa: E402


def test_no_stats_flag_parses():
    assert build_parser().parse_args(["layer", "--no-stats"]).no_stats is True
    assert build_parser().parse_args(["layer"]).no_stats is False


@pytest.mark.parametrize("stats", [True, False])
def test_moedist_cases_build_their_layer_with_the_flag(stats):
    T, H, F, E = 32, 16, 16, 4
    cfg = LayerBenchConfig(tokens=T, hidden=H, ffn=F, experts=E, iters=1, warmup=0, impls=("moedist",),
                           modes=("capacity", "dropless"), memory=False, repeats=1, stats=stats)
    x = torch.randn(T, H, requires_grad=True)
    cases, _ = build_cases(cfg, torch.device("cpu"), torch.float32, x, torch.randn(T, H), torch.randn(E, H) * 0.1)
    moedist = [c for c in cases if c.impl == "moedist"]
    assert len(moedist) == 2
    for c in moedist:
        assert c.notes["layer"].stats is stats
        c.forward()
    _, aux = moedist[0].notes["layer"](x)
    assert (aux.router_entropy is None) is (not stats) and (aux.dropped_frac is None) is (not stats)
