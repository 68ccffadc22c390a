"""Quick diagnostics of the sm90 forward on the device: per case, the max error against the fp32
reference and, when it fails, where (query rows in 64-row groups, head-dim chunks of 16) the error is.

    PYTHONPATH=python:tests/cuda FLASH_ATTENTION_LIBRARY=build/dev/_C.so python tests/cuda/sm90_probe.py [--small]
    (or FA_SM90_SHIM=build/.../sm90_shim.so instead of the op library: see sm90_run.py)
"""

import sys

import torch

from sm90_run import fwd
from flash_attention import reference

CASES = [  # b, sq, sk, h, hk, d, causal, window, softcap, config
    (1, 128, 128, 1, 1, 128, False, (-1, -1), 0.0, "sm90:m128n128w12s2"),
    (1, 128, 300, 1, 1, 128, False, (-1, -1), 0.0, "sm90:m128n128w12s2"),
    (2, 1000, 1000, 4, 4, 128, False, (-1, -1), 0.0, ""),
    (2, 1000, 1000, 4, 4, 128, True, (-1, -1), 0.0, ""),
    (2, 513, 1037, 8, 2, 64, True, (-1, -1), 0.0, ""),
    (2, 700, 700, 4, 4, 64, False, (100, 20), 0.0, ""),
    (2, 257, 257, 4, 2, 64, False, (-1, -1), 30.0, ""),
    (2, 200, 300, 4, 4, 80, False, (-1, -1), 0.0, ""),
    (1, 300, 300, 2, 2, 256, True, (-1, -1), 0.0, ""),
    (2, 1000, 1000, 4, 4, 256, False, (-1, -1), 0.0, ""),
    (3, 1, 333, 8, 1, 128, True, (-1, -1), 0.0, ""),
    (4, 2048, 2048, 16, 16, 128, True, (-1, -1), 0.0, ""),               # many tiles per CTA
]
VARLEN = ([100, 0, 37, 256, 300], [80, 12, 0, 300, 129])


def varlen_case(causal):
    lq, lk = VARLEN
    q = torch.randn(sum(lq), 8, 128, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(sum(lk), 2, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    cu = [torch.tensor([0] + torch.tensor(x).cumsum(0).tolist(), dtype=torch.int32, device="cuda") for x in (lq, lk)]
    out, lse, _ = fwd(q, k, v, cu[0], cu[1], max(lq), max(lk), 0.0, 128 ** -0.5, causal, -1, -1, 0.0, None, "")
    win = (-1, 0) if causal else (-1, -1)
    ref, ref_lse = reference.attention(q, k, v, cu[0], cu[1], max(lq), max(lk), softmax_scale=128 ** -0.5, window=win)
    low, _ = reference.attention(q, k, v, cu[0], cu[1], max(lq), max(lk), softmax_scale=128 ** -0.5, window=win,
                                 upcast=False)
    err = (out.float() - ref.float()).abs().max().item()
    base = (low.float() - ref.float()).abs().max().item()
    lse_err = (lse - ref_lse).abs().nan_to_num(0.0, posinf=1e9).max().item()
    ok = err <= 2 * base + 1e-5 and lse_err < 2e-3 and not torch.isnan(out).any()
    print(f"varlen causal={causal}: {'OK ' if ok else 'BAD'} err {err:.3g} (2x lowp {2 * base:.3g}) lse_err {lse_err:.3g}")


def main(cases):
    for b, sq, sk, h, hk, d, causal, window, softcap, config in cases:
        q = torch.randn(b, sq, h, d, dtype=torch.bfloat16, device="cuda")
        k, v = (torch.randn(b, sk, hk, d, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        torch.empty(b, sq, h, d, dtype=torch.bfloat16, device="cuda").fill_(float("nan"))
        scale = d ** -0.5
        try:
            out, lse, _ = fwd(q, k, v, None, None, sq, sk, 0.0, scale, causal, window[0], window[1], softcap,
                                  None, config)
            torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001 - report and go on
            print(f"case {(b, sq, sk, h, hk, d, causal, window, softcap, config)}: ERROR {error}")
            continue
        win = (window[0], 0) if causal else window
        ref, ref_lse = reference.attention(q, k, v, softmax_scale=scale, window=win, softcap=softcap)
        low, _ = reference.attention(q, k, v, softmax_scale=scale, window=win, softcap=softcap, upcast=False)
        err = (out.float() - ref.float()).abs()
        base = (low.float() - ref.float()).abs().max().item()
        lse_err = (lse - ref_lse).abs().nan_to_num(0.0, posinf=1e9).max().item()
        nan = torch.isnan(out).sum().item()
        ok = err.max().item() <= 2 * base + 1e-5 and nan == 0 and lse_err < 2e-3
        print(f"case {(b, sq, sk, h, hk, d, causal, window, softcap, config)}: {'OK ' if ok else 'BAD'} "
              f"err {err.max().item():.3g} (2x lowp {2 * base:.3g}) lse_err {lse_err:.3g} nan {nan}")
        if not ok:
            e = err.nan_to_num(1e9).amax(dim=(0, 2))                      # (sq, d)
            rows = [f"{e[i:i + 64].max().item():.2g}" for i in range(0, sq, 64)]
            cols = [f"{e[:, j:j + 16].max().item():.2g}" for j in range(0, d, 16)]
            print("   by 64 rows:", " ".join(rows[:24]))
            print("   by 16 cols:", " ".join(cols))
            print("   lse by 64 rows:", " ".join(f"{(lse - ref_lse).abs().nan_to_num(0.0, posinf=1e9).amax(dim=(0, 1))[i:i + 64].max().item():.2g}" for i in range(0, sq, 64))[:400])


if __name__ == "__main__":
    # --small: two tiny cases, for compute-sanitizer runs.
    small = "--small" in sys.argv
    main(CASES[2:3] if small else CASES)
    varlen_case(True)
    if not small:
        varlen_case(False)
