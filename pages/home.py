"""Home: the idea in a few lines, the guided tour, and where to go."""

import common  # noqa: F401
import streamlit as st

import tour

st.title("EnergyLens")
st.markdown(
    """
Look at adversarially robust image classifiers **as energy-based models**, following
*Shedding More Light on Robust Classifiers under the lens of Energy-based Models* (Mirza et al., ECCV 2024).

A classifier with logits $f(x)$ defines two energies (Eq. 2):
"""
)
st.latex(r"E_\theta(x) = -\log\sum_k \exp f(x)[k] \qquad E_\theta(x,y) = -f(x)[y]")
st.markdown("and its cross-entropy is their difference (Eq. 3):")
st.latex(r"\mathcal{L}_{CE}(x,y) = E_\theta(x,y) - E_\theta(x) \;\ge 0")
st.markdown(
    r"""
Low $E(x)$ means *likely from the model's point of view*. The paper reports that untargeted attacks such as PGD
lower $E(x)$ while raising $E(x,y)$, that targeted attacks push $E(x)$ up, that during adversarial training the gap
$\Delta E(x) = E(x) - E(x^*)$ between natural and adversarial energies reveals **robust overfitting**, that TRADES
keeps it small, and it proposes WEAT, which weights samples by $1/\log(1+e^{|E(x)|})$. Every page checks these claims
on the model and images you choose, with real CIFAR-10 images by default.
"""
)
st.subheader("Start here: a guided tour in seven clicks")
st.caption("Each step opens a page with its settings made, runs what it needs (each page says how long its work "
           "took on this machine) and says what to look at.")
tour.step_list()
st.markdown("**Where to go**")
c = st.columns(3)
links = [("../pages/models.py", "Models", "Bundled checkpoints, your runs and the RobustBench zoo."),
         ("../pages/attack_lab.py", "Attack Lab", "Attack a model and watch energies drift (Fig. 1, Fig. 2)."),
         ("../pages/training.py", "Training studio", "SAT / TRADES / MART / MAIL / WEAT jobs with live ΔE (Fig. 3)."),
         ("../pages/sgld.py", "SGLD studio", "Generate images from a robust classifier (Eq. 7, Fig. 5e)."),
         ("../pages/landscape.py", "Energy landscape", "ΔE across models (Fig. 4)."),
         ("../pages/analysis.py", "Sample analysis", "Margins, entropy and energy per class (Fig. 5)."),
         ("../pages/embeddings.py", "Embedding explorer", "PCA / UMAP of features coloured by energy."),
         ("../pages/evaluation.py", "Evaluation", "Natural / PGD / AutoAttack tables (Table 1).")]
from pathlib import Path  # noqa: E402

here = Path(common.__file__).resolve().parent
for k, (path, label, text) in enumerate(p for p in links if (here / p[0]).resolve().is_file()):
    with c[k % 3]:
        st.page_link(path, label=label)
        st.caption(text)
st.caption("Pick a model in the sidebar; it is shared by every page. Nothing needs a GPU or the internet: the "
           "bundled models run on a CPU, on 500 real CIFAR-10 test images shipped with EnergyLens (Krizhevsky, 2009) "
           "or on an embedded digits dataset.")
