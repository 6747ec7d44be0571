"""core.claims (the paper's Sec. 3.1 statements checked on a trace), core.energy.typicality (the out-of-distribution
hint) and core.saved (results kept across a page reload)."""

from __future__ import annotations

import numpy as np
import pytest

from core.claims import NEAR_ZERO, energy_shift, expected_direction, marginal_claim, model_kind, overlap_coefficient
from core.drift import EnergyTrace
from core.energy import typicality
from core.errors import InputError


def trace(e_nat, e_adv, attack="pgd", targeted=False) -> EnergyTrace:
    e_nat, e_adv = np.asarray(e_nat, np.float32), np.asarray(e_adv, np.float32)
    n = len(e_nat)
    m = np.stack([e_nat, e_adv])
    return EnergyTrace(marginal=m, joint=m + 1, pred=np.zeros((2, n), np.int64), loss=np.zeros((2, n), np.float32),
                       labels=np.zeros(n, np.int64), steps=np.array([0, 10]),
                       meta={"attack": {"name": attack, "targeted": targeted}})


rng = np.random.default_rng(0)
NAT = rng.normal(-8, 1, 200)


def test_expected_directions_follow_the_paper():
    assert expected_direction("pgd") == "lower" and expected_direction("pgd", targeted=True) == "raise"
    assert expected_direction("apgd-t") == "raise" and expected_direction("fab") == "raise"
    assert expected_direction("cw") == expected_direction("cw", True) == expected_direction("square") == "overlap"
    assert expected_direction("unknown-attack") is None


def plain(t, **kw):
    return marginal_claim(t, method="plain", **kw)


def test_untargeted_claim_holds_when_energy_goes_down_and_fails_when_it_goes_up():
    down = plain(trace(NAT, NAT - 2))
    assert down.holds is True and down.mean_delta == pytest.approx(2, abs=1e-4) and down.share_lowered == 1.0
    assert "lowered E(x) for 100% of these 200 images" in down.text and "the claim holds" in down.text
    assert down.shift.outcome == "lower" and down.shift.lo > 1.5 and "Sec. 3.1" in down.text
    up = plain(trace(NAT, NAT + 1.5))
    assert up.holds is False and up.shift.outcome == "raise" and "does not hold" in up.text
    assert "+" not in up.text.split("ΔE(x) = ")[1][:1], "the sign is printed as computed"
    # mostly unmoved, a few pushed far down: the mean is positive but the standardised shift is inside the band
    tiny = plain(trace(NAT, NAT + np.where(np.arange(200) < 190, 0.0, -2.0)))
    assert tiny.shift.outcome in ("overlap", "undecided") and tiny.holds is not True


def test_targeted_claim_is_the_opposite():
    assert plain(trace(NAT, NAT + 2, targeted=True)).holds is True
    c = plain(trace(NAT, NAT - 2, targeted=True))
    assert c.holds is False and c.shift.outcome == "lower"


def test_overlap_claim_for_margin_attacks_uses_the_effect_size_rule():
    near = plain(trace(NAT, NAT + rng.normal(0, 0.05, 200), attack="cw"))
    assert near.holds is True and near.overlap > 0.8 and near.shift.outcome == "overlap"
    far = plain(trace(NAT, NAT - 6, attack="cw"))
    assert far.holds is False and far.overlap < 0.1
    # issue 23: a 1 SD shift shares ~60% of the histogram area and used to be called "overlap"
    one_sd = plain(trace(NAT, NAT + NAT.std(), attack="square"))
    assert one_sd.overlap > 0.5 and one_sd.shift.outcome == "raise" and one_sd.holds is False
    assert overlap_coefficient(NAT, NAT) == pytest.approx(1.0)
    assert overlap_coefficient([0, 0, 0], [5, 5, 5]) == 0.0


def test_adjacent_cases_read_consistently():
    """Two attacks with nearly the same shift get the same outcome, whatever the attack (one rule for all)."""
    a = plain(trace(NAT, NAT + 3.53, attack="apgd-t"))
    b = plain(trace(NAT, NAT + 3.74, attack="cw", targeted=True))
    assert a.shift.outcome == b.shift.outcome == "raise"
    assert a.holds is True and b.holds is False   # the paper expects 'raise' for APGD-T and 'overlap' for CW-T


def test_shift_rule_and_interval():
    s = energy_shift(NAT, NAT - 0.5 * NAT.std())
    assert s.outcome == "lower" and s.lo < s.d < s.hi and s.d == pytest.approx(0.5, rel=1e-6)
    s = energy_shift(NAT, NAT + 0.1 * NAT.std())
    assert s.outcome == "overlap" and -NEAR_ZERO <= s.lo and s.hi <= NEAR_ZERO
    few = energy_shift(NAT[:8], NAT[:8] - 0.3 * NAT.std() + rng.normal(0, 0.5, 8))
    assert few.outcome == "undecided" and few.lo < NEAR_ZERO < few.hi
    assert energy_shift(NAT, NAT - 0.3) == energy_shift(NAT, NAT - 0.3), "deterministic (fixed seed)"
    assert energy_shift([np.nan], [1.0]).outcome == "undecided"


def test_robust_models_are_judged_against_fig4():
    """Issue 23: a robust model under PGD is judged by the robust claim (E(x) stays put), not by Sec. 3.1."""
    t = trace(NAT, NAT - 0.15 * NAT.std())           # SAT-like: a small shift
    for method in ("sat", "trades", "weat-adv"):
        c = marginal_claim(t, method=method)
        assert c.kind == "robust" and c.holds is True and "Fig. 4" in c.text and "Sec. 3.1" not in c.text
    assert plain(t).holds is False and plain(t).kind == "non-robust"       # a plain model must move it
    big = marginal_claim(trace(NAT, NAT - 2), method="sat")
    assert big.holds is False and "does not hold" in big.text
    # other attacks on a robust model: the paper states no claim
    assert marginal_claim(trace(NAT, NAT + 2, attack="fab"), method="sat").holds is None
    zoo = marginal_claim(t, source="zoo", model_name="Carmon2019Unlabeled")
    assert zoo.kind == "robust" and zoo.holds is True
    assert marginal_claim(t, source="zoo", model_name="Standard").kind == "non-robust"


def test_model_kind_from_measurement_when_the_training_is_unknown():
    assert model_kind(robust_accuracy=0.45)[0] == "robust" and "45%" in model_kind(robust_accuracy=0.45)[1]
    assert model_kind(robust_accuracy=0.0)[0] == "non-robust"
    assert model_kind() == (None, "the model's training is unknown")
    assert model_kind("plain")[0] == "non-robust" and model_kind("mart")[0] == "robust"


def test_claim_ignores_non_finite_points_and_handles_no_claim():
    e = NAT.copy()
    e[:10] = np.nan
    c = plain(trace(e, e - 1))
    assert c.n == 190 and c.holds is True
    assert plain(trace(NAT, NAT - 1, attack="mystery")).holds is None
    empty = plain(trace([np.nan], [np.nan]))
    assert empty.n == 0 and empty.holds is None


def test_typicality_percentile_and_threshold():
    ref = np.arange(1000, dtype=float)
    t = typicality(995.5, ref)
    assert t["out_of_distribution"] and t["percentile"] == pytest.approx(0.996) and t["threshold"] == pytest.approx(989.01)
    t = typicality(10.0, ref)
    assert not t["out_of_distribution"] and t["percentile"] == pytest.approx(0.01)
    assert typicality(5, [1, 2, np.nan, 3])["n_reference"] == 3
    with pytest.raises(InputError):
        typicality(1.0, [np.nan])
    with pytest.raises(InputError):
        typicality(1.0, ref, quantile=1.5)


# --------------------------------------------------------------------------------------------- core.saved
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path))
    return tmp_path


def test_saved_round_trip_clear_and_prune(cache):
    import os
    import time

    from core import saved

    sid = "ab" * 12
    a = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "names": np.array(["cat", "dog"])}
    saved.save(sid, "attack", a, {"model": "m", "n": np.int64(3)})
    arrays, meta = saved.load(sid, "attack")
    assert np.array_equal(arrays["x"], a["x"]) and list(arrays["names"]) == ["cat", "dog"]
    assert meta == {"model": "m", "n": 3}
    assert saved.load(sid, "sgld") is None
    saved.clear(sid, "attack")
    assert saved.load(sid, "attack") is None
    saved.save(sid, "attack", a, {})
    old = time.time() - 30 * 86400
    for p in (cache / "sessions" / sid).iterdir():
        os.utime(p, (old, old))
    os.utime(cache / "sessions" / sid, (old, old))
    assert saved.prune() == 1 and not (cache / "sessions" / sid).exists()


@pytest.mark.parametrize("sid", ["../../etc", "short", "ABCDEF0123456789", "a" * 65, "", None])
def test_saved_refuses_ids_that_are_not_opaque_tokens(cache, sid):
    from core import saved

    with pytest.raises(InputError):
        saved.save(sid, "attack", {"x": np.zeros(1)}, {})
    assert not any(cache.rglob("*.npz"))


def test_saved_corrupt_file_is_dropped_not_raised(cache):
    from core import saved

    sid = "cd" * 12
    path = saved.sessions_dir() / sid / "attack.npz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a zip")
    assert saved.load(sid, "attack") is None and not path.exists()
    with pytest.raises(InputError):
        saved.save(sid, "attack", {"o": np.array([object()], dtype=object)}, {})


def test_claim_judges_only_the_images_the_attack_changed():
    """AutoAttack returns untouched images unchanged (ΔE = 0): they must not dilute the share or the mean."""
    t = trace(NAT, NAT - 1.0, attack="apgd-ce")
    t.perturbed = np.arange(200) < 80          # 120 images left untouched
    t.marginal[-1, 80:] = t.marginal[0, 80:]
    c = marginal_claim(t, method="plain")
    assert c.n == 80 and c.share_lowered == 1.0 and c.mean_delta == pytest.approx(1.0, abs=1e-4)
    assert "of the 80 images it changed (120 left untouched)" in c.text and c.holds is True
    t.perturbed = np.zeros(200, bool)
    assert marginal_claim(t).n == 0 and marginal_claim(t).holds is None
