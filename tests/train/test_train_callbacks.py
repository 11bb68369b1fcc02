"""fit() drives training-time schedules: AdaLoRA's rank budget and LISA's layer sampling."""
import torch

import deltakit as dk
from deltakit.train import fit
from tests.conftest import make_model
from tests.train.train_helpers import token_label_loader as _loader




def test_adalora_budget_reaches_target_through_fit():
    from deltakit.methods.adalora import AdaLoraConfig, AdaLoRABudget

    model = make_model("bert")
    ad = dk.attach(model, AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=10))
    budget = AdaLoRABudget(ad)
    fit(model, _loader(), lr=1e-2, max_steps=10, progress=False, callbacks=[budget])
    ranks = [int((d.lora_E.detach() != 0).sum()) for _, d in ad.deltas()]
    assert sum(ranks) == 2 * len(ranks)


def test_lisa_schedule_trains_only_sampled_blocks():
    from deltakit.methods.lisa import LisaConfig, LisaSchedule

    model = make_model("bert")
    ad = dk.attach(model, LisaConfig(gamma=1, period=3, exclude=("position_embeddings",)))
    schedule = LisaSchedule(ad)
    before = {n: p.detach().clone() for n, p in ad.named_parameters()}
    seen = set()

    class Spy:
        def on_step(self, step, m):
            seen.add(schedule.active)

    fit(model, _loader(), lr=1e-2, max_steps=9, progress=False, params=dict(ad.named_parameters()),
        callbacks=[schedule, Spy()])
    changed = {n for n, p in ad.named_parameters() if not torch.equal(p, before[n])}
    blocks = {int(n.split(".")[3]) for n in changed if n.startswith("bert.encoder.layer.")}
    assert blocks <= {b for active in seen for b in active} | set(schedule.active)
    assert any(not n.startswith("bert.encoder.layer.") for n in changed)   # embeddings/head always train
