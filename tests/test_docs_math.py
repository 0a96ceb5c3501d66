"""docs/math.md: every citation of it in the code and the README names a section it has, and
the key formulas it states are the ones the code computes.

A formula is checked twice: its text must appear in the document exactly as written here, and
the same formula, written here in Python, must agree with the code. A document that drifts from
the code then fails one check or the other.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import bns
from bns.estimate import gn_step_work
from bns.families import BNSFamily
from bns.gauss_newton import levenberg_marquardt
from bns.grids import uniform
from bns.metrics import psnr
from bns.model import prediction_coefficients
from bns.schedules import EDM, VP, CondOT, Cosine
from bns.solvers import euler
from bns.solvers.ends import data_end_row

SRC = Path(bns.__file__).parent
ROOT = SRC.parents[1]
DOC = ROOT / "docs" / "math.md"
README = ROOT / "README.md"
F64 = torch.float64

CITATION = re.compile(r"docs/math\.md, section (\d+)")

# The section headings, stable: code and README cite them by number.
SECTIONS = {
    1: "Conventions: time, paths, models",
    2: "Non-stationary (NS) solvers",
    3: "Scale-time transformations and preconditioning",
    4: "Training",
    5: "Measuring",
    6: "Grids",
}


def _doc() -> str:
    return DOC.read_text()


def _cited_files() -> list[Path]:
    return sorted(SRC.rglob("*.py")) + [README]


def _in_doc(formula: str) -> None:
    """``formula`` appears in the document as inline code, exactly."""
    assert f"`{formula}`" in _doc(), f"docs/math.md does not state `{formula}`"


def test_the_document_has_its_numbered_sections():
    headings = re.findall(r"^## (\d+)\. (.+)$", _doc(), flags=re.M)
    assert {int(n): title.strip() for n, title in headings} == SECTIONS
    assert [int(n) for n, _ in headings] == sorted(SECTIONS)


def test_every_citation_names_a_section_of_the_document():
    doc = _doc()
    found = []
    for path in _cited_files():
        for n in CITATION.findall(path.read_text()):
            found.append((path.relative_to(ROOT), int(n)))
            assert re.search(rf"^## {n}\. ", doc, flags=re.M), (
                f"{path.relative_to(ROOT)} cites docs/math.md, section {n}, which it lacks"
            )
    # 17 citations in 15 modules when this test was written: a pattern that finds none is broken.
    assert len(found) >= 10, found


def test_the_readme_links_the_document():
    assert "](docs/math.md)" in README.read_text()


def test_no_citation_of_the_private_design_note_remains():
    for path in [*_cited_files(), DOC]:
        assert "bns-math" not in path.read_text(), f"{path.relative_to(ROOT)} cites bns-math.md"


def test_the_jvp_count_of_a_gauss_newton_step():
    """Per pair: one JVP per evaluation time, and s + 2 tangents starting at step s, carried
    through the n - s remaining evaluations (gn_step_work in estimate.py)."""
    _in_doc("n + sum_{s=1}^{n-1} (s+2)(n-s)")
    _in_doc("n^2 + (n^3 - n)/6")
    for n in range(1, 25):
        stated = n + sum((s + 2) * (n - s) for s in range(1, n))
        assert stated == n * n + (n**3 - n) // 6
        assert gn_step_work(n, pairs=1)[1] == stated
        assert gn_step_work(n, pairs=7)[1] == 7 * stated


def _schedules():
    return [VP(), CondOT(), CondOT(0.7), Cosine(), EDM()]


@pytest.mark.parametrize("schedule", _schedules(), ids=repr)
def test_the_velocity_of_each_prediction_type(schedule):
    _in_doc("beta = alpha'/alpha")
    _in_doc("gamma = sigma' - sigma alpha'/alpha")
    _in_doc("beta = sigma'/sigma")
    _in_doc("gamma = alpha' - alpha sigma'/sigma")
    _in_doc("beta = (alpha' alpha + sigma' sigma)/n")
    _in_doc("gamma = (sigma' alpha - alpha' sigma)/n")
    _in_doc("n = alpha^2 + sigma^2")
    t = torch.linspace(0.05, 0.95, 7, dtype=F64)
    a, s, da, ds = schedule(t)
    n = a * a + s * s
    stated = {
        "velocity": (torch.zeros_like(t), torch.ones_like(t)),
        "eps": (da / a, ds - s * da / a),
        "x1": (ds / s, da - a * ds / s),
        "v": ((da * a + ds * s) / n, (ds * a - da * s) / n),
    }
    for prediction, (beta, gamma) in stated.items():
        b, g = prediction_coefficients(prediction, schedule, t)
        torch.testing.assert_close(b, beta, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, gamma, rtol=1e-12, atol=1e-12)


def test_the_step_to_the_data():
    """The data end's row: ``x_n = c x_{n-1} + d u_{n-1}`` with the x1 coefficients."""
    _in_doc("x_n = x1_hat(x_{n-1}, t_{n-1}) = c x_{n-1} + d u_{n-1}")
    _in_doc("a_{n-1} = c a_{n-2}")
    _in_doc("b_{n-1,j} = c b_{n-2,j}")
    _in_doc("b_{n-1,n-1} = d")
    schedule = VP()
    g = torch.Generator().manual_seed(0)
    n = 4
    a, b = torch.randn(n, generator=g, dtype=F64), torch.randn(n, n, generator=g, dtype=F64).tril()
    t = torch.tensor(0.8, dtype=F64)
    al, si, dal, dsi = (v.reshape(()) for v in schedule(t.reshape(1)))
    beta, gamma = dsi / si, dal - al * dsi / si
    c, d = -beta / gamma, 1 / gamma
    row_a, row_b = data_end_row(a, b, t, schedule)
    torch.testing.assert_close(row_a, c * a[n - 2])
    torch.testing.assert_close(row_b[: n - 1], c * b[n - 2, : n - 1])
    torch.testing.assert_close(row_b[n - 1], d)


def test_the_sizes_of_the_bns_family():
    """``(n^2 + 5n - 2)/2`` free numbers: n - 1 interior times (n softmax logits), n values a_i,
    n(n+1)/2 values b_ij."""
    _in_doc("(n^2 + 5n - 2)/2")
    for n in (1, 2, 5, 8, 16):
        family = BNSFamily(euler(uniform(n)))
        free = (family.logits.numel() - 1) + family.a.numel() + int(family.mask.sum())
        assert free == (n * n + 5 * n - 2) // 2
    assert (8 * 8 + 5 * 8 - 2) // 2 == 51 and (16 * 16 + 5 * 16 - 2) // 2 == 167


def test_the_levenberg_marquardt_step():
    _in_doc("d = -(H + lam diag(H))^{-1} g")
    H = torch.tensor([[2.0, 0.5], [0.5, 8.0]], dtype=F64)
    g = torch.tensor([1.0, -3.0], dtype=F64)
    p = torch.zeros(2, dtype=F64)
    lam = 0.5
    loss, lam_after = levenberg_marquardt([p], 1.0, H, g, lambda: 0.0, lam)
    expected = -torch.linalg.solve(H + lam * torch.diag(H.diagonal()), g)
    torch.testing.assert_close(p, expected)
    assert loss == 0.0 and math.isclose(lam_after, lam / 3)


def test_psnr():
    _in_doc("PSNR = 10 log10(R^2 / MSE)")
    x = torch.zeros(3, 4, 4)
    ref = torch.full((3, 4, 4), 0.1)
    mse = 0.1**2
    torch.testing.assert_close(
        psnr(x, ref, data_range=2.0), torch.full((3,), 10 * math.log10(4 / mse))
    )


def test_formulas_the_code_states_are_stated_alike():
    """Formulas the docstrings write out appear in the document letter for letter."""
    for formula in (
        "x_{i+1} = a_i x_0 + sum_{j <= i} b_{i,j} u_j",  # solver.py
        "ubar_r(x) = (s_r'/s_r) x + t_r' s_r u_{t_r}(x / s_r)",  # transforms.py
        "loss = mean_k log ||x_n(x_0^k) - x(1; x_0^k)||^2 / D",  # loss.py
        "u_t(x) = beta_t x + gamma_t f_t(x)",  # model.py
    ):
        sources = [p for p in SRC.rglob("*.py") if formula in p.read_text()]
        assert sources, f"no module states {formula!r} any more: update this test and the doc"
        assert formula in _doc(), f"docs/math.md does not state {formula!r}"
