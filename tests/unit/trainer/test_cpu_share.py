"""trainer/cpu_share.py: the trainer's threads follow the cores the rest of the node leaves it, sampled
from /proc, and change between decoder layers in the forward and the backward."""

import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import policy_step
from trainer import parallel
from trainer.cpu_share import CoreShare

pytestmark = pytest.mark.skipif(not CoreShare.available(), reason="needs Linux /proc")


def test_another_process_spinning_counts_and_this_process_does_not():
    share = CoreShare(period_s=0.2).start()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.5)
        assert share.others_busy >= 0.6  # about one core; more if anything else runs beside the test
    finally:
        spinner.kill()
        spinner.wait()
    # this process's own work is not the rest of the node's: with the spinner gone, a busy loop here
    # leaves others_busy at what the rest of the node does without it
    time.sleep(0.5)
    quiet = share.others_busy
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        pass
    assert share.others_busy < quiet + 0.5
    share.stop()


def test_threads_change_between_layers_in_forward_and_backward(tiny_model_dir, tmp_path):
    step = policy_step(tiny_model_dir, tmp_path, "trainer.pack_sequences=false")  # a plain forward
    share = CoreShare()  # not started: others_busy is set by hand
    if share.cores < 2:
        pytest.skip("needs two cores")
    share.follow(parallel.decoder_layers(step.model))
    seen: list[tuple[str, int]] = []
    last = parallel.decoder_layers(step.model)[-1]
    last.register_forward_hook(lambda *_: seen.append(("forward", torch.get_num_threads())))
    ids = torch.randint(0, 100, (1, 16))
    share.others_busy = 1.0  # an engine generating: one core less
    out = step.model(input_ids=ids).logits
    share.others_busy = 0.0  # the engine went idle during the forward: the backward takes every core
    out.float().pow(2).mean().backward()
    seen.append(("backward", torch.get_num_threads()))
    assert seen == [("forward", share.cores - 1), ("backward", share.cores)]
    assert share.changes == 2
    torch.set_num_threads(share.cores)
