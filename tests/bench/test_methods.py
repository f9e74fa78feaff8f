"""The methods as engine configurations: the fitting factor, which engine serves which length, specs."""

from __future__ import annotations

import pytest

from bench.evals import methods
from bench.evals.methods import METHODS, fitting_factor, get_methods


@pytest.mark.parametrize(("context", "factor"), [(1, 1.0), (8192, 1.0), (8193, 2.0), (16384, 2.0),
                                                  (16385, 4.0), (65536, 8.0), (100000, 8.0)])
def test_fitting_factor_is_the_plugins_bucket(context, factor):
    assert fitting_factor(context) == factor


def test_yarn_fit_is_plain_rope_up_to_l_and_static_yarn_past_it():
    fit = METHODS["yarn-fit"]
    assert fit.engine_for(8192) == methods.plain()
    assert fit.engine_for(8193) == methods.static_yarn(2)
    assert fit.engine_for(32768).name == "yarn-x4"
    assert [fit.scale(n) for n in (4096, 16384, 65536)] == [1.0, 2.0, 8.0]


def test_plain_rope_past_l_gets_a_table_that_covers_its_positions():
    unscaled = METHODS["unscaled"]
    assert unscaled.engine_for(8192) == methods.plain()  # the stock config
    long = unscaled.engine_for(8193)
    assert long.hf_overrides == {"max_position_embeddings": 65536} and long.capacity == 65536
    assert methods.ntk(8).hf_overrides["max_position_embeddings"] == 65536


def test_the_plugin_serves_every_length_with_one_engine():
    plugin = METHODS["dynamic-yarn"]
    assert {plugin.engine_for(n) for n in (512, 8192, 65536)} == {
        methods.plugin("dynamic_yarn", buckets=methods.FINE_BUCKETS)}
    assert plugin.scale(8192) == 1.0 and plugin.scale(8193) == 2.0
    assert plugin.extra_args(8193) == {"rope_factor": 2.0}  # the policy decides, the engine applies
    assert METHODS["yarn-x8"].extra_args(8193) is None


@pytest.mark.parametrize(("context", "plain", "headroom", "fine"), [
    (8192, 1.0, 1.0, 1.0),          # at or below L every policy is exact: scale 1
    (10240, 2.0, 2.0, 2 ** 0.5),    # 10240 <= floor(8192 * sqrt 2) = 11585
    (12288, 2.0, 2.0, 2.0),         # headroom: 1.25 x 12288 = 15360 fits 2
    (16384, 2.0, 4.0, 2.0),         # headroom: 20480 needs 4
    (24576, 4.0, 4.0, 4.0),         # 3 x L: the fine bucket 2.83 is too small
    (32768, 4.0, 8.0, 4.0),
])
def test_the_candidate_policies(context, plain, headroom, fine):
    assert METHODS["dynamic-yarn"].scale(context) == plain
    assert METHODS["dynamic-yarn-headroom"].scale(context) == headroom
    assert METHODS["dynamic-yarn-fine"].scale(context) == fine
    engines = {METHODS[m].engine_for(context) for m in ("dynamic-yarn", "dynamic-yarn-headroom", "dynamic-yarn-fine")}
    assert len(engines) == 1  # one plugin engine holds every bucket of the three


def test_specs():
    plain = methods.plain().spec("m", dtype="bfloat16", max_len=16384)
    assert plain.max_model_len == 16384 and plain.env[methods.LONG_ENV] == "1"
    assert plain.hf_overrides is None and not plain.enable_prefix_caching
    assert plain.kv_cache_gib * 2**30 >= 16384 * methods.KV_BYTES_PER_TOKEN
    assert methods.LONG_ENV not in methods.plain().spec("m", dtype="bfloat16", max_len=4096).env
    yarn = methods.static_yarn(8).spec("m", dtype="bfloat16", max_len=1024)
    assert yarn.max_model_len == 65536 and methods.LONG_ENV not in yarn.env
    assert yarn.hf_overrides == {"rope_parameters": {"rope_type": "yarn", "rope_theta": 100000.0, "factor": 8.0,
                                                     "original_max_position_embeddings": 8192},
                                 "max_position_embeddings": 65536}
    assert methods.linear(8).hf_overrides["rope_parameters"]["rope_type"] == "linear"
    assert methods.ntk(8).hf_overrides["rope_parameters"]["rope_type"] == "ntk"
    assert methods.plugin("dynamic_ntk").hf_overrides["rope_parameters"]["rope_type"] == "dynamic_ntk"
    assert methods.static_yarn(1) == methods.plain()


def test_unknown_methods_are_named_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown method.*bogus.*known: unscaled"):
        get_methods(["unscaled", "bogus"])
