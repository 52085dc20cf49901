"""train.precision: what ``auto`` resolves to on the CPU, fp16 refused, the warning for bf16 on a CPU without it."""

import pytest
import torch

from tunelab.errors import UserError
from tunelab.train import precision as P

CPU = torch.device("cpu")


def test_auto_is_bf16_only_where_the_cpu_multiplies_bf16_natively(monkeypatch):
    monkeypatch.setattr(P, "cpu_supports_bf16", lambda: False)
    assert P.resolve_precision("auto", CPU) == "fp32"
    monkeypatch.setattr(P, "cpu_supports_bf16", lambda: True)
    assert P.resolve_precision("auto", CPU) == "bf16"
    assert P.resolve_precision("fp32", CPU) == "fp32"


def test_fp16_on_the_cpu_is_a_one_line_error():
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        P.resolve_precision("fp16", CPU)


def test_bf16_asked_for_on_a_cpu_without_it_warns_with_the_measured_slowdown(monkeypatch):
    monkeypatch.setattr(P, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(P, "bf16_slowdown", lambda: 65.2)
    warning = P.slow_bf16_warning("bf16", CPU)
    assert "65x slower than fp32" in warning and "train.precision: auto" in warning and "\n" not in warning
    assert P.slow_bf16_warning("fp32", CPU) is None  # only when bf16 was asked for
    monkeypatch.setattr(P, "bf16_slowdown", lambda: 1.3)  # a CPU whose flags we do not know but that is fast
    assert P.slow_bf16_warning("bf16", CPU) is None
    monkeypatch.setattr(P, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(P, "bf16_slowdown", lambda: pytest.fail("no probe where the flags say bf16 is native"))
    assert P.slow_bf16_warning("bf16", CPU) is None


def test_the_probe_times_both_dtypes_on_this_cpu():
    threads = torch.get_num_threads()
    slower = P.bf16_slowdown(64)
    assert slower > 0 and torch.get_num_threads() == threads  # timed on one thread, the setting put back
    if P.cpu_supports_bf16():  # AMX / AVX512-BF16: bf16 is not the reference kernel's speed
        assert slower < 10
