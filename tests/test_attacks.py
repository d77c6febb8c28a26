"""Attacks: bounds, strength ordering, worst case over restarts, no side effects, reproducibility."""

import torch

from functools import partial

from rcomp.attacks import ATTACKS, evaluate, evaluate_examples, fgsm, fgsm_rs, nfgsm, pgd, uniform_noise
from rcomp.masks import attach_masks
from rcomp.models import create_model

EPS = 4 / 255  # on this data 4/255 leaves PGD accuracy strictly between 0 and clean


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_perturbations_stay_in_the_eps_ball_and_in_the_pixel_box(trained):
    model, x, y = trained
    x = x.clone()
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.0, 1.0  # pixels at the box edges must be clipped, not pushed out
    for name, adv in {
        "fgsm": fgsm(model, x, y, EPS),
        "fgsm_rs": fgsm_rs(model, x, y, EPS, generator=_gen()),
        "pgd": pgd(model, x, y, EPS, alpha=EPS / 4, steps=5, restarts=2, generator=_gen()),
        "noise": uniform_noise(x, EPS, _gen()),
    }.items():
        assert (adv - x).abs().max() <= EPS + 1e-6, name
        assert adv.min() >= 0 and adv.max() <= 1, name


def test_nfgsm_is_not_projected_back_to_the_eps_ball(trained):
    model, x, y = trained
    adv = nfgsm(model, x, y, EPS, generator=_gen())
    linf = (adv - x).abs().max()
    assert EPS + 1e-6 < linf <= 3 * EPS + 1e-6  # noise up to 2 eps plus a step of eps
    assert adv.min() >= 0 and adv.max() <= 1


def test_pgd_is_at_least_as_strong_as_fgsm_which_beats_clean(trained):
    model, x, y = trained
    clean = evaluate(model, (x, y)).clean
    fgsm_acc = evaluate(model, (x, y), fgsm, eps=EPS).adv
    pgd_acc = evaluate(model, (x, y), pgd, eps=EPS, alpha=EPS / 4, steps=10, generator=_gen()).adv
    assert clean >= 0.9
    assert pgd_acc <= fgsm_acc <= clean
    assert pgd_acc < clean - 0.1


def test_restarts_keep_the_per_example_worst_case(trained):
    model, x, y = trained
    kw = dict(eps=EPS, alpha=EPS, steps=2)  # a weak attack, so restarts find more
    single = pgd(model, x, y, restarts=1, generator=_gen(7), **kw)
    multi = pgd(model, x, y, restarts=6, generator=_gen(7), **kw)  # its first restart == single
    with torch.no_grad():
        fooled_single = model(single).argmax(1) != y
        fooled_multi = model(multi).argmax(1) != y
    assert bool((fooled_multi | ~fooled_single).all()), "an example fooled once must stay fooled"
    assert int(fooled_multi.sum()) > int(fooled_single.sum())


def test_attacks_leave_grads_buffers_and_mode_untouched():
    torch.manual_seed(0)
    masked = attach_masks(create_model("tiny_cnn", 10, 3), "channel", torch.rand(1, 3, 16, 16))
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    params = list(masked.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)  # an existing gradient must survive too
    buffers = [b.clone() for b in masked.buffers()]
    for train_mode in (True, False):
        masked.train(train_mode)
        for attack in (fgsm_rs, nfgsm, fgsm, pgd):
            attack(masked, x, y, generator=_gen())
        evaluate(masked, (x, y), pgd, steps=2, generator=_gen())
        assert masked.training is train_mode
    assert torch.equal(params[0].grad, torch.full_like(params[0], 0.5))
    assert all(p.grad is None for p in params[1:]), "attack generation polluted a .grad"
    assert all(torch.equal(a, b) for a, b in zip(buffers, masked.buffers())), "BatchNorm statistics changed"


def test_attacks_are_reproducible_and_leave_the_global_rng_alone(trained):
    model, x, y = trained
    rng = torch.get_rng_state()
    for attack in (fgsm_rs, nfgsm, pgd):
        a, b = attack(model, x, y, EPS, generator=_gen(3)), attack(model, x, y, EPS, generator=_gen(3))
        assert torch.equal(a, b)
        assert not torch.equal(a, attack(model, x, y, EPS, generator=_gen(4)))
    assert torch.equal(rng, torch.get_rng_state())


def test_training_attack_registry():
    from rcomp.recipe import ATTACK_NAMES

    assert ATTACKS["fgsm-rs"] is fgsm_rs and ATTACKS["nfgsm"] is nfgsm and ATTACKS["none"] is None
    assert tuple(ATTACKS) == ATTACK_NAMES  # the recipe's choices are the attacks that exist


def test_evaluate_counts_batches_and_caps_examples(trained):
    model, x, y = trained
    batches = [(x[:64], y[:64]), (x[64:], y[64:])]
    full = evaluate(model, batches, fgsm, eps=EPS)
    assert full.n == 200 and full.adv == evaluate(model, (x, y), fgsm, eps=EPS).adv
    assert evaluate(model, batches, max_examples=100).n == 100


def test_evaluate_examples_gives_each_examples_correctness_per_attack_and_per_class(trained):
    model, x, y = trained
    attacks = {"fgsm": partial(fgsm, eps=EPS), "pgd": partial(pgd, eps=EPS, alpha=EPS / 4, steps=5, generator=_gen())}
    res = evaluate_examples(model, (x, y), attacks, batch_size=64, keep_logits=True)
    assert res.n == 200 and torch.equal(res.labels, y) and list(res.correct) == ["clean", "fgsm", "pgd"]
    with torch.no_grad():
        assert torch.equal(res.correct["clean"], model(x).argmax(1) == y)
        assert torch.equal(res.correct["fgsm"], model(fgsm(model, x, y, eps=EPS)).argmax(1) == y)
    assert torch.allclose(res.logits["clean"], model(x).detach(), atol=1e-5)
    worst = res.all_of()
    assert torch.equal(worst, res.correct["clean"] & res.correct["fgsm"] & res.correct["pgd"])
    assert 0 < int(worst.sum()) < res.count("clean")  # the attacks break some correct examples, not all
    per_class = res.per_class("clean", num_classes=11)
    assert per_class[10] is None  # no example of that class
    for k in range(10):
        assert per_class[k] == float(res.correct["clean"][y == k].float().mean())
    again = evaluate_examples(model, torch.utils.data.TensorDataset(x, y), {"fgsm": partial(fgsm, eps=EPS)}, batch_size=64)
    assert torch.equal(again.correct["fgsm"], res.correct["fgsm"])  # a Dataset reads the same batches


class _Stubborn(torch.nn.Module):
    """Predicts class 3 whatever the input, with an input-dependent loss (so gradients are not zero)."""

    def __init__(self, features: int, classes: int = 10):
        super().__init__()
        self.linear = torch.nn.Linear(features, classes)
        self.bias = torch.zeros(classes)
        self.bias[3] = 1e3

    def forward(self, x):
        return self.linear(x.flatten(1)) + self.bias


def test_predicted_label_attacks_ascend_the_models_prediction_not_the_truth(trained):
    _, x, y = trained
    model = _Stubborn(x[0].numel())
    assert bool((y != 3).any())  # on those images the two choices of label give different directions
    three = torch.full_like(y, 3)
    for attack in (fgsm_rs, nfgsm):
        predicted = attack(model, x, y, EPS, generator=_gen(), predicted_labels=True)
        assert torch.equal(predicted, attack(model, x, three, EPS, generator=_gen())), attack.__name__
        assert not torch.equal(predicted, attack(model, x, y, EPS, generator=_gen())), attack.__name__


def test_attack_labels_is_a_recipe_key_and_a_cli_option():
    import pytest

    from rcomp.errors import ConfigError
    from rcomp.pipeline import build_job
    from rcomp.train import TrainConfig

    job = build_job({"model_name": "tiny_cnn", "data_spec": "synthetic:64", "attack_labels": "predicted"},
                    profile=None, out=None, method="dense")
    assert job.train.attack_labels == "predicted"
    assert TrainConfig().attack_labels == "true"
    with pytest.raises(ConfigError, match="attack_labels"):
        TrainConfig(attack_labels="guessed").validate()
