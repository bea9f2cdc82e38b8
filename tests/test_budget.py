import pickle

import pytest

from compressor.budget import LATENCY_TARGETS, Budget, Constraint, parse_budget
from compressor.errors import ConfigError


@pytest.mark.parametrize("text, expected", [
    ("flops<=50%", Constraint("flops", 50.0, relative=True)),
    ("params<=2.5M", Constraint("params", 2.5e6)),
    ("flops<=300M", Constraint("flops", 3e8)),
    ("flops<=1.2G", Constraint("flops", 1.2e9)),
    ("params<=500K", Constraint("params", 5e5)),
    ("params<=.5k", Constraint("params", 500.0)),
    ("params<=123456", Constraint("params", 123456.0)),
    ("flops<=3e8", Constraint("flops", 3e8)),
    ("flops<=100%", Constraint("flops", 100.0, relative=True)),
    ("flops<=0.5%", Constraint("flops", 0.5, relative=True)),
    ("latency<=3ms@ort-cpu", Constraint("latency", 3000.0, target="ort-cpu")),
    ("latency<=250us@torch-cuda", Constraint("latency", 250.0, target="torch-cuda")),
    ("latency<=0.5s@trt-int8", Constraint("latency", 5e5, target="trt-int8")),
    ("latency<=60%@trt-fp16", Constraint("latency", 60.0, relative=True, target="trt-fp16")),
    ("  FLOPs <= 50 %  ", Constraint("flops", 50.0, relative=True)),
    ("Latency <= 3 MS @ ORT-CUDA", Constraint("latency", 3000.0, target="ort-cuda")),
])
def test_valid_single_constraint(text, expected):
    budget = parse_budget(text)
    assert budget == Budget([expected])
    assert budget[0] == expected


def test_every_latency_target_parses():
    for target in LATENCY_TARGETS:
        assert parse_budget(f"latency<=2ms@{target}")[0].target == target


def test_several_constraints_keep_order():
    budget = parse_budget("params<=2.5M, flops<=50% ,latency<=3ms@ort-cpu,latency<=1ms@trt-fp16")
    assert [c.metric for c in budget] == ["params", "flops", "latency", "latency"]
    assert budget.metrics == ("params", "flops", "latency")
    assert [c.target for c in budget if c.metric == "latency"] == ["ort-cpu", "trt-fp16"]


@pytest.mark.parametrize("text, bad_part", [
    ("flops<50%", "'flops<50%'"),
    ("flops=50%", "'flops=50%'"),
    ("flops>=50%", "'flops>=50%'"),
    ("flops<=<=50%", "'flops<=<=50%'"),
    ("50%", "'50%'"),
    ("flop<=50%", "unknown metric 'flop'"),
    ("macs<=1G", "unknown metric 'macs'"),
    ("<=50%", "unknown metric ''"),
    ("flops<=", "bad value ''"),
    ("flops<=abc", "bad value 'abc'"),
    ("flops<=-5M", "bad value '-5M'"),
    ("flops<=5 0M", "bad value '5 0M'"),
    ("flops<=0%", "percentage 0% is outside (0, 100]"),
    ("flops<=150%", "percentage 150% is outside (0, 100]"),
    ("flops<=0", "must be a positive number"),
    ("params<=0M", "must be a positive number"),
    ("params<=2.5MB", "unknown suffix 'MB'"),
    ("flops<=50%%", "unknown suffix '%%'"),
    ("flops<=3ms", "unknown suffix 'ms'"),
    ("flops<=1T", "unknown suffix 'T'"),
    ("latency<=3@ort-cpu", "latency '3' needs a unit us, ms or s"),
    ("latency<=3M@ort-cpu", "latency '3M' needs a unit"),
    ("latency<=3ms", "latency needs a target after '@'"),
    ("latency<=50%", "latency needs a target after '@'"),
    ("latency<=3ms@", "unknown target ''"),
    ("latency<=3ms@onnx", "unknown target 'onnx'"),
    ("latency<=3ms@ort-cpu@trt-fp16", "unknown target 'ort-cpu@trt-fp16'"),
    ("flops<=50%@ort-cpu", "a target (@ort-cpu) is only allowed for latency"),
    ("params<=1M@trt-fp16", "a target (@trt-fp16) is only allowed for latency"),
    ("", "empty constraint"),
    ("   ", "empty constraint"),
    ("flops<=50%,", "empty constraint"),
    ("flops<=50%,,params<=1M", "empty constraint"),
    ("flops<=50%,params<1M", "'params<1M'"),
    ("flops<=50%,flops<=1G", "flops is bounded twice"),
    ("latency<=3ms@ort-cpu,latency<=50%@ort-cpu", "latency on ort-cpu is bounded twice"),
])
def test_malformed_budget_names_the_bad_part(text, bad_part):
    with pytest.raises(ConfigError) as caught:
        parse_budget(text)
    message = str(caught.value)
    assert bad_part in message
    assert "expected METRIC<=VALUE, e.g. 'flops<=50%'" in message


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_budget("flops<50%")


@pytest.mark.parametrize("wrong", [None, 0.5, ["flops<=50%"]])
def test_non_string_budget_is_rejected(wrong):
    with pytest.raises(ConfigError, match="a budget is a string"):
        parse_budget(wrong)


@pytest.mark.parametrize("text", [
    "flops<=50%", "params<=2.5M", "latency<=3ms@ort-cpu", "latency<=60%@trt-fp16",
    "params<=1234567", "flops<=33.333%", "flops<=1e-05%", "latency<=0.25us@ort-cuda",
    "latency<=1.5ms@torch-cpu", "latency<=2s@trt-fp32", "flops<=123456789012",
    "params<=2.5M,flops<=50%,latency<=3ms@ort-cpu,latency<=1ms@trt-int8",
])
def test_str_round_trips(text):
    budget = parse_budget(text)
    assert parse_budget(str(budget)) == budget
    assert str(parse_budget(str(budget))) == str(budget)


@pytest.mark.parametrize("text, canonical", [
    (" FLOPs <= 300 m ", "flops<=300M"),
    ("params<=2500000", "params<=2.5M"),
    ("params<=999", "params<=999"),
    ("latency<=1500us@ORT-CPU", "latency<=1.5ms@ort-cpu"),
    ("latency<=0.002s@ort-cpu", "latency<=2ms@ort-cpu"),
    ("latency<=1000ms@ort-cpu", "latency<=1s@ort-cpu"),
    ("flops<=50.0%", "flops<=50%"),
])
def test_str_is_canonical(text, canonical):
    assert str(parse_budget(text)) == canonical


def test_odd_values_round_trip_exactly():
    # Values whose scaled form is not exact in binary must still come back bit-identical.
    for value in (0.1 + 0.2, 1 / 3, 2 ** 0.5 * 1e6, 7e-3, 123456789.123):
        for metric, target in (("flops", None), ("params", None), ("latency", "ort-cpu")):
            constraint = Constraint(metric, value, target=target)
            assert parse_budget(str(constraint))[0] == constraint
        relative = Constraint("flops", value % 100, relative=True)
        assert parse_budget(str(relative))[0] == relative


def test_limit_resolves_relative_and_absolute():
    assert parse_budget("flops<=50%")[0].limit(40.8e6) == pytest.approx(20.4e6)
    assert parse_budget("params<=100%")[0].limit(269722) == 269722
    assert parse_budget("latency<=60%@ort-cpu")[0].limit(2500.0) == pytest.approx(1500.0)
    assert parse_budget("params<=2.5M")[0].limit() == 2.5e6
    assert parse_budget("params<=2.5M")[0].limit(1e9) == 2.5e6  # the original does not matter
    assert parse_budget("latency<=3ms@ort-cpu")[0].limit() == 3000.0  # microseconds
    assert parse_budget("latency<=0.5s@ort-cpu")[0].limit() == 5e5
    assert isinstance(Constraint("params", 3).limit(), float)


def test_relative_limit_needs_the_original():
    with pytest.raises(ConfigError, match="'flops<=50%' is relative"):
        parse_budget("flops<=50%")[0].limit()


def test_existing_budget_and_constraint_are_accepted():
    budget = parse_budget("flops<=50%,params<=1M")
    assert parse_budget(budget) is budget
    constraint = Constraint("params", 1e6)
    assert parse_budget(constraint) == Budget([constraint])


@pytest.mark.parametrize("kwargs, bad_part", [
    (dict(metric="memory", value=1.0), "unknown metric 'memory'"),
    (dict(metric="flops", value=0.0), "must be a positive number"),
    (dict(metric="flops", value=float("nan")), "must be a positive number"),
    (dict(metric="flops", value=float("inf")), "must be a positive number"),
    (dict(metric="flops", value=101.0, relative=True), "outside (0, 100]"),
    (dict(metric="latency", value=3.0), "latency needs a target"),
    (dict(metric="latency", value=3.0, target="cpu"), "unknown target 'cpu'"),
    (dict(metric="params", value=3.0, target="ort-cpu"), "only allowed for latency"),
])
def test_constraint_validates_itself(kwargs, bad_part):
    with pytest.raises(ConfigError) as caught:
        Constraint(**kwargs)
    assert bad_part in str(caught.value)


def test_budget_checks_its_members():
    with pytest.raises(ConfigError, match="no constraint given"):
        Budget([])
    with pytest.raises(ConfigError, match="a Budget holds Constraints"):
        Budget(["flops<=50%"])
    with pytest.raises(ConfigError, match="params is bounded twice"):
        Budget([Constraint("params", 1e6), Constraint("params", 50.0, relative=True)])


def test_budget_is_an_immutable_hashable_picklable_value():
    budget = parse_budget("flops<=50%,latency<=3ms@ort-cpu")
    assert isinstance(budget, tuple)
    assert budget == parse_budget("flops <= 50%, latency <= 3000us @ ort-cpu")
    assert hash(budget) == hash(parse_budget(str(budget)))
    assert pickle.loads(pickle.dumps(budget)) == budget
    assert type(pickle.loads(pickle.dumps(budget))) is Budget
    assert repr(budget) == "Budget('flops<=50%,latency<=3ms@ort-cpu')"
    with pytest.raises(AttributeError):
        budget[0].value = 10.0
