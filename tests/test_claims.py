"""core.claims (the paper's Sec. 3.1 statements checked on a trace), core.energy.typicality (the out-of-distribution
hint) and core.saved (results kept across a page reload)."""

from __future__ import annotations

import numpy as np
import pytest

from core.claims import expected_direction, marginal_claim, overlap_coefficient
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


def test_untargeted_claim_holds_when_energy_goes_down_and_fails_when_it_goes_up():
    down = marginal_claim(trace(NAT, NAT - 2))
    assert down.holds is True and down.mean_delta == pytest.approx(2, abs=1e-4) and down.share_lowered == 1.0
    assert "lowered E(x) for 100% of these 200 images" in down.text and "as the paper reports" in down.text
    up = marginal_claim(trace(NAT, NAT + 1.5))
    assert up.holds is False and "does not follow the paper's Sec. 3.1 claim" in up.text
    assert "+" not in up.text.split("ΔE(x) = ")[1][:1], "the sign is printed as computed"
    mixed = marginal_claim(trace(NAT, NAT + np.where(np.arange(200) < 120, 0.2, -2.0)))  # 40% lowered, mean > 0
    assert mixed.holds is False and mixed.mean_delta > 0 and "mixed" in mixed.text


def test_targeted_claim_is_the_opposite():
    assert marginal_claim(trace(NAT, NAT + 2, targeted=True)).holds is True
    c = marginal_claim(trace(NAT, NAT - 2, targeted=True))
    assert c.holds is False and "not raised" in c.text


def test_overlap_claim_for_margin_attacks():
    near = marginal_claim(trace(NAT, NAT + rng.normal(0, 0.05, 200), attack="cw"))
    assert near.holds is True and near.overlap > 0.8 and "overlap" in near.text
    far = marginal_claim(trace(NAT, NAT - 6, attack="cw"))
    assert far.holds is False and far.overlap < 0.1
    assert overlap_coefficient(NAT, NAT) == pytest.approx(1.0)
    assert overlap_coefficient([0, 0, 0], [5, 5, 5]) == 0.0


def test_claim_ignores_non_finite_points_and_handles_no_claim():
    e = NAT.copy()
    e[:10] = np.nan
    c = marginal_claim(trace(e, e - 1))
    assert c.n == 190 and c.holds is True
    assert marginal_claim(trace(NAT, NAT - 1, attack="mystery")).holds is None
    empty = marginal_claim(trace([np.nan], [np.nan]))
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
    c = marginal_claim(t)
    assert c.n == 80 and c.share_lowered == 1.0 and c.mean_delta == pytest.approx(1.0, abs=1e-4)
    assert "of the 80 images it changed (120 left untouched)" in c.text and c.holds is True
    t.perturbed = np.zeros(200, bool)
    assert marginal_claim(t).n == 0 and marginal_claim(t).holds is None
