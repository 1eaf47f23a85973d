"""One rank of tests/test_distributed.py's collectives check (started twice with RANK / WORLD_SIZE / MASTER_*)."""
from __future__ import annotations

import json
import sys
import time

import torch

from prefpretrain import distributed


def main() -> None:
    info = distributed.setup("gloo", "cpu", timeout_s=int(sys.argv[1]))
    r = info.rank
    out: dict = {"rank": r, "world": info.world_size, "comm_device": str(distributed.comm_device())}
    out["sum"] = distributed.all_sum([r, 1.0])
    out["sum_tensor"] = distributed.all_sum(torch.tensor([2.0 * r, 0.5], dtype=torch.float32))
    out["max"] = distributed.all_max([float(r)])
    out["any_only_rank1"] = distributed.any_true(r == 1)
    out["any_none"] = distributed.any_true(torch.tensor(0.0))
    out["broadcast"] = distributed.broadcast_object({"from": r})
    out["gathered"] = distributed.all_gather_object(f"rank{r}")
    out["rank0_does"] = distributed.rank0_does("a quick job", lambda: "done")
    t0 = time.time()
    try:  # rank 0 fails: the others must hear of it at once, not after the timeout
        distributed.rank0_does("a failing job", lambda: (_ for _ in ()).throw(ValueError("boom on rank 0")))
        out["failure"] = None
    except Exception as e:  # noqa: BLE001 - the test reads what each rank saw
        out["failure"] = f"{type(e).__name__}: {e}"
    out["failure_seconds"] = time.time() - t0
    print(json.dumps(out), flush=True)
    distributed.teardown()


if __name__ == "__main__":
    main()
