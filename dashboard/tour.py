"""The guided tour ("Start here"): seven steps through the paper, each one click that opens a page with its widgets set.

A step is data (:data:`STEPS`): the page it opens, the widget values it sets (by widget key) and what to look at. Home
lists the steps; :func:`banner` shows the current step's explanation at the top of the page it opened, with a button
to the next step. Every number the pages show is computed on the spot: the tour only chooses the settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import streamlit as st

from navigation import page_file

PLAIN, SAT, TRADES, WEAT = "cifar10-demo-plain", "cifar10-demo-sat", "cifar10-demo-trades", "cifar10-demo-weat-adv"
SAT_PEAK, SAT_END = "cifar10-demo-2k-sat-peak", "cifar10-demo-2k-sat-end"   # the Fig. 3 SAT run's two checkpoints
RUN = "recorded:cifar10-demo-"
FIG3 = RUN + "2k-"            # the small-data recorded runs in which SAT overfits (checkpoints/runs/cifar10-demo-2k-*)
ATTACK = {"atk_name": "pgd", "atk_norm": "Linf", "atk_eps255": 8.0, "atk_steps": 10, "atk_auto_step": True,
          "atk_n": 64, "atk_seed": 0, "atk_targeted": False, "atk_compare": False}


@dataclass(frozen=True)
class Step:
    title: str
    page: str                       # key of navigation.PAGES
    text: str                       # what to look at (two or three sentences, markdown)
    model: str | None = None        # bundled model to select in the sidebar
    widgets: dict = field(default_factory=dict)
    focus: str = ""                 # what the page puts first for this step: "natural" (the Attack Lab's natural-
                                    # energy scatter, even over a result), "fig3" (the Training studio's Fig. 3 chart)


STEPS: list[Step] = [
    Step("Energies of real images (Eq. 2 and 3)", "attack", model=PLAIN, widgets={**ATTACK}, focus="natural",
         text="Each dot is a CIFAR-10 test image at its marginal energy E(x) = −logsumexp f(x) and its joint energy "
              "E(x, y) = −f(x)[y]. Their difference is the cross-entropy (Eq. 3), so every dot lies on or above the "
              "dashed zero-loss line; misclassified images sit far above it."),
    Step("Fig. 1: PGD bends the energy of a non-robust model", "attack", model=PLAIN,
         widgets={**ATTACK, "atk_autorun": True},
         text="Untargeted PGD (ε = 8/255, 10 steps) on the non-robust model. Each arrow goes from a natural image to "
              "its adversarial version: the paper reports that they point left (lower E(x), 'more likely' to the "
              "model) and up (higher E(x, y)). The green or orange line under the chart checks that on these images."),
    Step("Fig. 1 side by side: plain vs adversarially trained", "attack", model=PLAIN,
         widgets={**ATTACK, "atk_compare": True, "atk_model_b": SAT, "atk_autorun": True},
         text="The same 64 images and the same attack on the plain model and on the SAT model, on shared axes. Compare "
              "the arrow lengths and the two ΔE(x) figures: a robust model bends its energy far less (the paper's "
              "Fig. 4)."),
    Step("Fig. 2: targeted attacks flip the drift", "attack", model=PLAIN,
         widgets={**ATTACK, "atk_name": "apgd-t", "atk_autorun": True},
         text="APGD-T, AutoAttack's targeted attack (the one of the paper's Fig. 2), raises the logit of a wrong class "
              "instead of only lowering the true one. The paper reports that it moves the adversarial E(x) "
              "distribution right, out of distribution; compare the histograms, and read the line under the arrows "
              "for what it does here. (Targeted PGD with cross-entropy can go either way: on a confident model it "
              "raises the target logit so far that E(x) falls; try it with the Targeted box.)"),
    Step("Fig. 3: the three phases of robust overfitting", "training", focus="fig3",
         widgets={"tr_view": FIG3 + "sat", "tr_compare": [FIG3 + "sat", FIG3 + "trades", FIG3 + "weat-adv"]},
         text="Real SAT, TRADES and WEAT runs on 2,000 CIFAR-10 training images without augmentation, where a small "
              "model can memorise its training set under attack. The paper reports that ΔE(x) = E(x) − E(x*) of "
              "training images settles, plateaus, then falls steeply once the robust test error rises, while TRADES "
              "keeps it flat: the chart at the top shows both, with the gap between training and test robust "
              "accuracy under it, and a sentence per run computed from its records."),
    Step("WEAT: weighting samples by their energy", "training", widgets={"tr_view": FIG3 + "weat-adv"},
         text="WEAT weights each sample by w(x) = 1/log(1 + e^|E(x)|): images whose energy is close to zero weigh "
              "most. Scroll to *WEAT weights* to see the weights of the probe images per epoch, and compare this "
              "run's ΔE(x) curve with SAT's."),
    Step("SGLD: generating images with a robust classifier (Eq. 7)", "sgld", model=SAT,
         widgets={"sgld_init_kind": "pca", "sgld_classes": [1, 7], "sgld_chains": 4, "sgld_autorun": True},
         text="SGLD with momentum from a PCA initialisation per class, using only the robust classifier. Press "
              "*Run 100 steps* and watch the images sharpen and the target E(x, y) fall towards the class average "
              "Ē(x, y) of real images (Fig. 5e); the plot marks the step where the chains pass it."),
]


# Not a tour step: the Training studio's "compare the peak and the end" button opens the Attack Lab with it.
PEAK_VS_END = Step("The Fig. 3 SAT run at its robust-accuracy peak vs at its end", "attack", model=SAT_PEAK,
                   widgets={**ATTACK, "atk_compare": True, "atk_model_b": SAT_END, "atk_autorun": True},
                   text="The same 64 test images and PGD-10 on SAT's checkpoint at its robust-accuracy peak (left) and "
                        "after overfitting (right).")


def open_step(step: Step) -> None:
    """Button callback: set a step's model and widgets and switch to its page, outside the tour."""
    _apply(step)
    st.session_state.pop("tour_step", None)
    st.session_state["tour_goto"] = step.page


def _apply(step: Step) -> None:
    if step.model:
        st.session_state["model_source"] = "Bundled"
        st.session_state["pick-Bundled"] = step.model
    for key, value in step.widgets.items():
        st.session_state[key] = value
        st.session_state.pop(f"_default_scope_{key}", None)  # the tour's value wins over a page default


def start(k: int) -> None:
    """Button callback for step ``k``: set its model and widgets (callbacks run before any widget of the next run
    exists, so even the sidebar's can be set) and ask :func:`follow` to switch to its page."""
    step = STEPS[k]
    _apply(step)
    st.session_state["tour_step"] = k
    st.session_state["tour_goto"] = step.page


def follow() -> None:
    """Switch to the page a tour button asked for (st.switch_page cannot run inside a callback)."""
    page = st.session_state.pop("tour_goto", None)
    if page is not None:
        st.switch_page(page_file(page))


def step_list() -> None:
    """Home: the steps, each with its button."""
    for k, step in enumerate(STEPS):
        with st.container(border=True):
            c1, c2 = st.columns([5, 1])
            c1.markdown(f"**{k + 1}. {step.title}**  \n{step.text}")
            c2.button(f"Open step {k + 1}", key=f"tour_go_{k}", type="primary" if k == 0 else "secondary", on_click=start, args=(k,))
    follow()


def current(page_key: str) -> Step | None:
    """The tour step being followed, when it belongs to the page ``page_key``."""
    k = st.session_state.get("tour_step")
    if not isinstance(k, int) or not 0 <= k < len(STEPS) or STEPS[k].page != page_key:
        return None
    return STEPS[k]


def banner(page_key: str) -> None:
    """At the top of a page the tour opened: the step's explanation and the way on. A "Next step" that leads to
    another page switches there first (the step it set belongs to that page, so nothing is drawn here)."""
    follow()
    k = st.session_state.get("tour_step")
    if not isinstance(k, int) or not 0 <= k < len(STEPS) or STEPS[k].page != page_key:
        return
    step = STEPS[k]
    with st.container(border=True):
        st.markdown(f":material/tour: **Tour, step {k + 1} of {len(STEPS)}: {step.title}**  \n{step.text}")
        c = st.columns([1, 1, 4])
        if k + 1 < len(STEPS):
            c[0].button("Next step", key="tour_next", type="primary", on_click=start, args=(k + 1,))
        c[1].button("End the tour", key="tour_end", on_click=lambda: st.session_state.pop("tour_step", None))
