"""The method registry (maskaq.methods): one record per method, read by the pipeline and the CLI."""
import pytest

from maskaq import methods
from maskaq.pipeline import build_config, config_keys


def test_every_method_builds_with_its_settings():
    keys = config_keys()
    for name, record in methods.METHODS.items():
        assert set(record.settings) <= set(keys), name
        cfg = build_config(name, "quick")
        sections = {k: getattr(getattr(cfg, keys[k]), k) for k in record.settings}
        assert sections == dict(record.settings), name


def test_student_in_the_loop_only_where_the_alignment_needs_it():
    in_loop = {n for n, m in methods.METHODS.items() if m.student_in_loop(build_config(n, "quick").synthesis)}
    assert in_loop == {"maskaq", "maskaq+", "maskaq-no-entropy", "maskaq-no-refresh", "maskaq-no-hdmask"}
    assert not methods.get("maskaq").student_in_loop(build_config("maskaq", "quick", align_weight=0.0).synthesis)


def test_lookup_suggests_and_filters():
    assert methods.get("mimiq").images == "synthesis" and methods.get("psaq").images == "psaq"
    with pytest.raises(ValueError, match="did you mean 'maskaq'"):
        methods.get("maskq")
    assert "real" in methods.names() and "ptq" in methods.names()
    assert not {"real", "ptq"} & set(methods.names(synthesizes=True))
    with pytest.raises(ValueError, match="unknown method 'real'"):
        methods.get("real", synthesizes=True)
    assert methods.did_you_mean("zzz", ["maskaq"]) == ""
