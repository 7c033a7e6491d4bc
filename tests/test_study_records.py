"""``nestopt study``: one record per study, and the CLI built from the records."""

from __future__ import annotations

import argparse

import pytest

from nestopt import cli
from nestopt.studies import registry

STUDIES = ["polyak", "large-lr", "controller", "controller-variants", "learned", "hpo", "games", "refit", "stopping"]


def _study_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["study"]


def test_every_study_has_a_record():
    assert registry.names() == STUDIES
    for name in STUDIES:
        s = registry.get(name)
        assert s.name == name and s.help and callable(s.run) and callable(s.summary)
    with pytest.raises(KeyError, match="unknown study 'nope'"):
        registry.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("polyak"))


def test_the_cli_takes_its_study_names_and_options_from_the_records(tmp_path, capsys):
    st = _study_parser()
    name = next(a for a in st._actions if a.dest == "name")
    assert name.help == "polyak, large-lr, controller, controller-variants, learned, hpo, games, refit or stopping"
    flags = {f for a in st._actions for f in a.option_strings} - {"-h", "--help", "--out", "--force", "--log-dir"}
    assert flags == {o.flag for s in registry.records() for o in s.options}
    for s in registry.records():
        assert s.name in st.description
    assert cli.main(["study", "nope", "--out", str(tmp_path)]) == 2
    assert f"valid names: {', '.join(registry.names())}" in capsys.readouterr().err
    # an option of another study is a usage error naming that study's options
    assert cli.main(["study", "hpo", "--peer", "adamw", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == ("nestopt: error: --peer 'adamw' does not apply to the hpo study: only learned takes --peer "
                   "(hpo takes no options)\n")


def test_options_reach_prepare_with_their_defaults(tmp_path):
    from nestopt.studies.controller import VARIANTS

    s = registry.get("controller-variants")
    assert {o.dest: o.default for o in s.options} == {"variant": (), "seeds": 3}
    assert s.prepare(tmp_path, variant=(), seeds=3) == {"variants": tuple(VARIANTS), "seeds": 3}
    with pytest.raises(ValueError, match=r"^--variant 'x' is unknown"):
        s.prepare(tmp_path, variant=("x",), seeds=3)
    assert s.wrote(tmp_path) == f"{tmp_path / 'variants.md'} and {tmp_path / 'variants.json'}"
    assert registry.get("hpo").wrote(tmp_path) == f"{tmp_path / 'report.md'}, {tmp_path / 'results.json'} and figures"


RESULTS = {
    "polyak": {"verdicts": {"exp1": [{"verdict": "holds", "claim": "c1"}]}},
    "large-lr": {"verdicts": [{"arm": "sgd", "verdict": "mixed", "claim": "c2"}]},
    "controller": {"robustness": {"adamw": {"robust": 13, "cells": 35}},
                   "ablations": [{"what": "signal `proxy`", "verdict": "hurt", "wins": 1, "losses": 9, "pairs": 21}]},
    "controller-variants": {"robustness": {"window 16": {"robust": 14, "cells": 35}}},
    "learned": {"rows": [{"name": "digits", "steps": 200, "net": "linear", "speedup": 1.5, "reached": 3, "seeds": 3,
                          "diverged": 0}], "long": []},
    "hpo": {"hpo": {"rows": [{"seed": 0, "tpe": {"test_acc": 0.9, "wall_s": 2.0},
                              "implicit": {"test_acc": 0.91, "wall_s": 1.0}}]}},
    "games": {"rates": {"rows": [{"method": "gda", "rho": 0.9, "measured": 0.91, "rel_err": 0.011}]},
              "gan": {"methods": {"adam": {"final_modes": 8, "final_high_quality": [0.91234]}}}},
    "refit": {"rows": [{"strategy": "warm", "speedup": 1.25, "speedup_ci90": [0.5, 2.0], "val_loss": 0.68412,
                        "pnl_total": 12.4}], "claim": [{"strategy": "learned-meta", "verdict": "false"}]},
    "stopping": {"prices": [{"d": 2, "s0": 90, "price": 8.07012, "se": 0.0051, "reference": 8.075, "rel_err": -0.000604}],
                 "verdicts": [{"key": "rates", "verdict": "does not hold", "claim": "c3"}]},
}
EXPECT = {
    "polyak": ["exp1  holds      c1"],
    "large-lr": ["sgd        mixed         c2"],
    "controller": ["robust rates  adamw              13/35",
                   "signal `proxy`               hurt             wins 1 losses 9 of 21"],
    "controller-variants": ["robust rates  window 16                    14/35"],
    "learned": [f"{'digits':44s}   200 {'linear':22s} speedup 1.50 reached 3/3 diverged 0"],
    "hpo": ["seed 0: TPE test acc 0.9000 in 2.0 s; per-weight implicit 0.9100 in 1.0 s"],
    "games": [f"{'gda':46s} analytic rho 0.90000 measured 0.91000 (1.10%)",
              f"GAN {'adam':32s} modes 8 high-quality [0.912]"],
    "refit": [f"{'warm':24s} speedup 1.25 (0.50-2.00)  val loss 0.6841  PnL 12 bp",
              "claim 50-200% faster: learned-meta false"],
    "stopping": ["price d=2 S0=90: 8.070 ± 0.005 (reference 8.075, -0.06%)", "rates    does not hold c3"],
}


@pytest.mark.parametrize("name", STUDIES)
def test_a_records_summary_renders_from_a_result(name):
    assert registry.get(name).summary(RESULTS[name]) == EXPECT[name]
