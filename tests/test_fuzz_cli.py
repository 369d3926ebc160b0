"""Fuzzed bad input through the real CLI (`nr_study.cli.main`): random train configs and search spaces.

Each case starts from a valid file and breaks it on purpose — unknown keys at every level of the schema, wrong
types, out-of-range numbers, NaN/inf, integers past 64 bits, a section replaced by a list or a scalar, odd
unicode, binary bytes, YAML the parser cannot build — and must end in exit 2 with only `error:` lines, one
naming each broken field (the train config: exactly one line per broken field), never a traceback or an
`internal error`, and nothing written. The mutations come from the schema itself (`nr_study.config`'s
dataclasses), so a new field is fuzzed without touching this file.

Every case is refused while the input is read, before a run starts: `nr-study train` goes through its real
preflight (device, data, model) up to the point where it would open the MLflow run, which is replaced by a
guard that fails the test ("accepted"); `nr-study sweep` runs with `--dry-run` or with `run_sweep` guarded the
same way. Hypothesis draws the cases with a fixed derandomized seed and a bounded count, so the suite is
deterministic; each test also checks how many distinct cases it ran.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import nr_study.config as C
import nr_study.schema as schema
import nr_study.sweep.space as S
from nr_study import cli

TINY = {
    "method": "NR-CR",
    "model": {"name": "vgg_small", "kwargs": {"width": 8}},
    "data": {"name": "synthetic", "n_train": 64, "n_test": 32, "synthetic": {"shape": [1, 8, 8]}},
    "optim": {"lr": 0.05},
    "train": {"epochs": 2, "batch_size": 16, "threads": 1},
    "nr": {"tr": 0.5},
    "tracking": {"experiment": "fuzz"},
}
SPACE = {"name": "fuzz", "base": TINY, "space": {"nr.tr": [0.3, 0.5]}}
SPACE_RANDOM = dict(SPACE, search={"type": "random", "seed": 0}, num_samples=2,
                    scheduler={"type": "asha", "grace_period": 1}, resources_per_trial={"cpu": 1, "gpu": 0},
                    tags={"table": "t", "cell": "{method}/{nr.tr}"}, repeat=2, max_failures=1, max_concurrent=1)
# NR_FUZZ_CLI_SCALE=K draws K times as many cases: a longer hunt (10: 9,269 distinct, ~4 min; 1: 1,001, ~20 s)
SCALE = int(os.environ.get("NR_FUZZ_CLI_SCALE", "1"))
SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=150 * SCALE,
                    suppress_health_check=list(HealthCheck))
MIN_CASES = 60


class Accepted(BaseException):
    """Raised where a run would start: the case got past every check. A BaseException, so the CLI's
    one-line handler for bugs does not swallow it."""


# ------------------------------------------------------------------------------------------ the schema
@dataclasses.dataclass(frozen=True)
class Leaf:
    key: str              # dotted
    base: type            # bool, int, float, str, tuple, dict
    optional: bool
    check: typing.Any     # (predicate, allowed text) or None


def _schema(cls=C.Config, prefix=""):
    sections, leaves = [prefix.rstrip(".")], []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            s, l_ = _schema(tp, f"{prefix}{f.name}.")
            sections += s
            leaves += l_
        else:
            base, optional = schema.unwrap_optional(tp)
            leaves.append(Leaf(prefix + f.name, base, optional, f.metadata.get("check")))
    return sections, leaves


SECTIONS, LEAVES = _schema()


def _section_class(section: str):
    cls = C.Config
    for part in filter(None, section.split(".")):
        cls = typing.get_type_hints(cls)[part]
    return cls


FIELDS = {s: {f.name for f in dataclasses.fields(_section_class(s))} for s in SECTIONS}
RANGED = [lf for lf in LEAVES if lf.check is not None]


def accepted_type(leaf: Leaf, v) -> bool:
    """What a field takes before its range check (the spec, written independently of the validator)."""
    if v is None:
        return leaf.optional
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if leaf.base is bool:
        return isinstance(v, bool)
    if leaf.base is int:
        return number and (isinstance(v, int) or v.is_integer())
    if leaf.base is float:
        if isinstance(v, str):
            try:
                float(v)
                return True
            except ValueError:
                return False
        return number
    return isinstance(v, {str: str, tuple: list, dict: dict}[leaf.base])


# ------------------------------------------------------------------------------------------ random values
ODD = ["", " ", "ü", "日本語", "😀", "\u202e", "a\nb", "tab\there", "\x00", "\x07", "\ufeff", "1e999", "nan",
       "-inf", "0x10", "~", "null", "yes", "{", "- x", "'", '"', "\\", "%s{}", "\u2028", "é" * 300]
TEXT = st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=12), st.sampled_from(ODD))
INTS = st.one_of(st.integers(-5, 300), st.integers(2**63, 10**40), st.integers(-(10**40), -(2**63) - 1),
                 st.sampled_from([0, -1, 2**63 - 1, 2**32, 10**18]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 1e-300]))
SCALAR = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT, st.binary(max_size=6))
KEYS = st.one_of(TEXT, INTS, st.booleans()).filter(lambda k: k != "<<")  # `<<` is YAML's merge key, not a key
JUNK = st.recursive(SCALAR, lambda ch: st.lists(ch, max_size=3) | st.dictionaries(KEYS, ch, max_size=3),
                    max_leaves=6)
NOT_A_MAPPING = JUNK.filter(lambda v: v is not None and not isinstance(v, dict))


def _finite(v) -> bool:
    return not (isinstance(v, float) and not math.isfinite(v))


def fits(leaf: Leaf, v) -> bool:
    """A value of the field's type is taken when it is an integer within 64 bits or a finite float, and the
    field's own range or choice holds."""
    if leaf.base is int and not schema.INT64[0] <= v <= schema.INT64[1]:
        return False
    if leaf.base is float:
        try:
            v = float(v)
        except OverflowError:
            return False
        if not math.isfinite(v):
            return False
    return leaf.check is None or leaf.check[0](v)


# ------------------------------------------------------------------------------------------ mutations
@dataclasses.dataclass
class Mutation:
    path: tuple           # where in the document
    value: typing.Any     # what is put there
    needle: str           # what the error line must contain (the field as the CLI names it)


@st.composite
def unknown_key(draw):
    section = draw(st.sampled_from(SECTIONS))
    key = draw(KEYS.filter(lambda k: k not in FIELDS[section]))
    parts = tuple(filter(None, section.split(".")))
    dotted = ".".join(parts + (schema.show_key(key),))
    return Mutation(parts + (key,), draw(JUNK), f"{dotted}: unknown key")


@st.composite
def wrong_type(draw):
    leaf = draw(st.sampled_from(LEAVES))
    value = draw(JUNK.filter(lambda v: not accepted_type(leaf, v)))
    return Mutation(tuple(leaf.key.split(".")), value, f"{leaf.key}: ")


@st.composite
def out_of_range(draw):
    """A value of the field's type that it refuses: outside its range or choices, NaN, inf, past 64 bits."""
    leaf = draw(st.sampled_from(RANGED + [lf for lf in LEAVES if lf.base in (int, float)]))
    pool = {int: INTS, float: st.one_of(FLOATS, INTS, st.sampled_from(["nan", "1e999", "-inf", str(10**400)])),
            str: TEXT, bool: st.booleans(), tuple: st.lists(SCALAR), dict: st.dictionaries(KEYS, SCALAR)}[leaf.base]
    value = draw(pool.filter(lambda v: v is not None and accepted_type(leaf, v) and not fits(leaf, v)))
    return Mutation(tuple(leaf.key.split(".")), value, f"{leaf.key}: ")


@st.composite
def wrong_nesting(draw):
    """A section replaced by a list, a scalar, binary bytes (null means 'all defaults' and is fine)."""
    section = draw(st.sampled_from([s for s in SECTIONS if s]))
    return Mutation(tuple(section.split(".")), draw(NOT_A_MAPPING), f"{section}: ")


@st.composite
def free_form(draw):
    """model.kwargs / tracking.tags with a key MLflow cannot log, or an integer past 64 bits inside."""
    key = draw(st.sampled_from(["model.kwargs", "tracking.tags"]))
    bad_key = st.one_of(INTS, st.booleans(), st.sampled_from(["", "a!b", "x/../y", "/abs", "..", "a\nb", "k" * 300,
                                                              "q?", "日本 #"]))
    value = draw(st.one_of(st.builds(lambda k, v: {k: v}, bad_key, SCALAR),
                           st.builds(lambda n: {"width": n}, st.integers(2**63, 10**30)),
                           st.builds(lambda n: {"opt": [1, {"deep": n}]}, st.integers(-(10**30), -(2**63) - 1))))
    return Mutation(tuple(key.split(".")), value, key)


MUTATION = st.one_of(unknown_key(), wrong_type(), out_of_range(), wrong_nesting(), free_form())


def _independent(muts) -> bool:
    paths = [m.path for m in muts]
    return all(a[: len(b)] != b for i, a in enumerate(paths) for j, b in enumerate(paths) if i != j)


def apply(doc: dict, muts) -> dict:
    doc = copy.deepcopy(doc)
    for m in muts:
        node = doc
        for part in m.path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[m.path[-1]] = m.value
    return doc


def dump(doc) -> bytes:
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False).encode("utf-8")


def flow(v) -> str:
    """`v` as a one-argument YAML value for --set."""
    text = yaml.safe_dump(v, default_flow_style=True, width=10**9, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...")


def set_value(m) -> str:
    """m's value as `--set KEY=VALUE` writes it; --set parses VALUE as YAML, so only values that read back the
    same are drawn (hypothesis.assume)."""
    value = flow(m.value)
    try:
        same = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        same = object()
    assume(repr(same) == repr(m.value))
    return value


# ------------------------------------------------------------------------------------------ whole files
INVALID_UTF8 = st.sampled_from([b"\x80", b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
CONTROL = st.sampled_from([b"\x00", b"\x01", b"\x08", b"\x0b", b"\x1b", b"\x7f"])


@st.composite
def broken_file(draw, good: bytes, what: str):
    """(file bytes, needle): the whole file is what is wrong."""
    kind = draw(st.sampled_from(["binary", "control", "not_a_mapping", "deep", "self_reference", "bomb",
                                 "unbuildable", "random_bytes"]))
    if kind == "binary":
        at = draw(st.integers(0, len(good)))
        return good[:at] + draw(INVALID_UTF8) + good[at:], "not UTF-8"
    if kind == "control":
        at = draw(st.integers(0, len(good)))
        return good[:at] + draw(CONTROL) + good[at:], "YAML syntax error"
    if kind == "not_a_mapping":
        v = draw(NOT_A_MAPPING.filter(lambda x: x not in ("", [])))
        return dump(v), ""
    if kind == "deep":
        n = draw(st.integers(101, 1500))
        open_, close = draw(st.sampled_from([("[", "]"), ("{a: ", "}")]))
        return f"name: {open_ * n}1{close * n}\n".encode(), "nested"
    if kind == "self_reference":
        return draw(st.sampled_from([b"a: &x [*x]\n", b"a: &x {b: *x}\n", b"base: &x [1, [*x]]\n"])), "refers to itself"
    if kind == "bomb":
        width, depth = draw(st.integers(8, 12)), draw(st.integers(7, 9))
        lines = ["l0: &l0 [" + ", ".join(["x"] * width) + "]"]
        lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, depth)]
        return ("\n".join(lines) + "\n").encode(), "expands to more than"
    if kind == "unbuildable":
        v = draw(st.sampled_from(["!!int x", "!!float x", "0x_", "!!timestamp x", "9" * 5000, "!!binary zz",
                                  "!!python/object:os.system x", "{? [1, 2] : 3}"]))
        return f"name: {v}\n".encode(), ""
    return b"\xff" + draw(st.binary(max_size=200)), "not UTF-8"


# ------------------------------------------------------------------------------------------ running the CLI
@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder with nothing from the environment; where a run would start, Accepted is raised."""
    import nr_study.sweep.runner as runner
    import nr_study.tracking as tracking

    def accept(*a, **k):
        raise Accepted()

    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "NR_STUDY_TRACEBACK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NR_STUDY_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(tracking, "open_run", accept)
    monkeypatch.setattr(runner, "run_sweep", accept)
    return tmp_path


def run(capsys, sandbox: Path, argv, data: bytes, name: str) -> list[str]:
    """Write the file, run the CLI; assert it refused the input the way bad input is refused. The lines."""
    path = sandbox / name
    path.write_bytes(data)
    before = sorted(p.name for p in sandbox.rglob("*"))
    try:
        rc = cli.main([argv[0], name, *argv[1:]])
    except Accepted:
        pytest.fail(f"accepted: {argv} on {data[:300]!r}")
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert rc == 2, (rc, lines, data[:300])
    assert cap.out == "", cap.out
    assert lines and all(ln.startswith("error: ") for ln in lines), (lines, data[:300])
    assert not any("internal error" in ln or "Traceback" in ln for ln in lines), lines
    path.unlink()
    assert sorted(p.name for p in sandbox.rglob("*")) == [n for n in before if n != name]  # nothing written
    return lines


def _named(lines, needle) -> bool:
    return any(needle in ln for ln in lines)


def _key(data: bytes, argv) -> tuple:
    return (data, tuple(argv))


# ------------------------------------------------------------------------------------------ train configs
def test_fuzzed_train_configs_are_refused_one_line_per_field(sandbox, capsys):
    seen: set = set()

    @SETTINGS
    @given(muts=st.lists(MUTATION, min_size=1, max_size=4).filter(_independent))
    def case(muts):
        data = dump(apply(TINY, muts))
        lines = run(capsys, sandbox, ["train"], data, "cfg.yaml")
        assert len(lines) == len(muts), (lines, muts)  # one line per broken field
        for m in muts:
            assert _named(lines, m.needle), (m.needle, lines)
            assert all(ln.startswith("error: cfg.yaml: ") for ln in lines), lines
        seen.add(_key(data, ["train"]))

    case()
    assert len(seen) >= MIN_CASES, len(seen)


def test_fuzzed_train_overrides_are_refused(sandbox, capsys):
    """The same mutations through `--set KEY=VALUE` on a valid file (one at a time: the first bad --set stops)."""
    seen: set = set()
    good = dump(TINY)

    @SETTINGS
    @given(m=st.one_of(wrong_type(), out_of_range(), wrong_nesting(), free_form(),
                       unknown_key().filter(lambda m: all(isinstance(p, str) and p.isidentifier() for p in m.path))))
    def case(m):
        value = set_value(m)
        argv = ["train", "--set", f"{'.'.join(map(str, m.path))}={value}"]
        lines = run(capsys, sandbox, argv, good, "cfg.yaml")
        assert len(lines) == 1 and _named(lines, m.needle.removesuffix(": ").rstrip()), (m, lines)
        seen.add(_key(good, argv))

    case()
    assert len(seen) >= MIN_CASES, len(seen)


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_fuzzed_override_into_a_broken_section_is_refused(command, sandbox, capsys):
    """A file whose section is a list or a value, and a `--set` below it: refused naming that section, never
    papered over with an empty mapping (which accepted a config or a search space nobody wrote)."""
    seen: set = set()

    @settings(SETTINGS, max_examples=40 * SCALE)
    @given(broken=wrong_nesting(), data=st.data())
    def case(broken, data):
        section = ".".join(broken.path)
        leaf = data.draw(st.sampled_from([lf for lf in LEAVES if lf.key.startswith(section + ".")]))
        doc, key = apply(TINY, [broken]), leaf.key
        if command == "sweep":
            doc, key, section = dict(SPACE, base=doc), f"base.{key}", f"base.{section}"
        argv = [command, "--set", f"{key}=1"] + (["--dry-run"] if command == "sweep" else [])
        lines = run(capsys, sandbox, argv, dump(doc), "f.yaml")
        assert len(lines) == 1 and f"{section}: " in lines[0] and "expected a mapping" in lines[0], lines
        seen.add(_key(dump(doc), argv))

    case()
    assert len(seen) >= 30, len(seen)


EDGE_VALUES = {  # valid values at the edges of what a field takes, as YAML can write them
    "nr.delta_r": st.one_of(st.floats(1e-300, 1e300), st.sampled_from(["5e-5", "1E-3", " 0.5 ", "1_0"])),
    "nr.delta_lambda": st.one_of(st.just(0), st.just(-0.0), st.floats(0, 1e300), st.sampled_from(["0", "5e-5"])),
    "nr.lambda_max": st.one_of(st.none(), st.floats(0, 1e300)),
    "nr.gamma0": st.floats(5e-324, 1e300),
    "optim.lr": st.one_of(st.floats(5e-324, 1e-1), st.sampled_from(["1e-3", "0.05"])),
    "optim.momentum": st.one_of(st.floats(0, 0.999999), st.just(0)),
    "seed": st.one_of(st.integers(0, C.SEED_MAX), st.sampled_from([3.0, float(C.SEED_MAX)])),
    "data.subset_seed": st.integers(0, C.SEED_MAX),
    "train.epochs": st.one_of(st.integers(1, 2**63 - 1), st.just(2.0)),
    "tracking.run_name": st.one_of(st.none(), TEXT.filter(lambda t: "\x00" not in t)),
    "tracking.tags": st.dictionaries(st.from_regex(r"[\w.\- :]{1,20}", fullmatch=True).filter(schema.mlflow_name_ok),
                                     st.one_of(TEXT.filter(lambda t: "\x00" not in t), st.integers(-10**18, 10**18),
                                               st.booleans(), st.none()), max_size=3),
}


def test_fuzzed_valid_edge_configs_are_accepted(sandbox, capsys, monkeypatch):
    """The other half of exact-or-refused: values at the edges of what fields take (tiny and huge floats, YAML's
    '5e-5' strings, 3.0 for an int, the largest seed, unicode names and tags MLflow takes) pass every check
    (config and preflight) and reach the point where the run would open."""
    seen: set = set()

    @settings(SETTINGS, max_examples=40 * SCALE)
    @given(values=st.fixed_dictionaries({}, optional=EDGE_VALUES).filter(bool))
    def case(values):
        muts = [Mutation(tuple(k.split(".")), v, "") for k, v in values.items()]
        data = dump(apply(TINY, muts))
        (sandbox / "cfg.yaml").write_bytes(data)
        with pytest.raises(Accepted):
            cli.main(["train", "cfg.yaml", "--quiet"])
        err = capsys.readouterr().err
        assert "error:" not in err, err
        seen.add(data)

    case()
    assert len(seen) >= 30, len(seen)


def test_fuzzed_model_options_are_refused_by_the_preflight(sandbox, capsys):
    """model.kwargs the registry refuses (an unknown option, a width that is not a positive integer): caught
    by train()'s preflight, which builds the model before any run exists."""
    seen: set = set()

    def not_a_width(v) -> bool:
        return not (isinstance(v, (int, float)) and _finite(v) and v == int(v) and v >= 1)

    @settings(SETTINGS, max_examples=25 * SCALE)
    @given(kw=st.one_of(st.dictionaries(st.from_regex(r"[a-z_]{1,10}", fullmatch=True).filter(lambda k: k != "width"),
                                        st.integers(1, 8), min_size=1, max_size=2),
                        st.builds(lambda w: {"width": w}, JUNK.filter(not_a_width))))
    def case(kw):
        try:
            C.config_from_dict({"model": {"kwargs": kw}})
        except C.ConfigError:
            assume(False)  # refused before the preflight already: the other tests have it
        doc = apply(TINY, [Mutation(("model", "kwargs"), kw, "")])
        data = dump(doc)
        lines = run(capsys, sandbox, ["train"], data, "cfg.yaml")
        assert len(lines) == 1 and "model" in lines[0], lines
        seen.add(_key(data, ["train"]))

    case()
    assert len(seen) >= 20, len(seen)


def test_fuzzed_train_files_are_refused(sandbox, capsys):
    seen: set = set()
    good = dump(TINY)

    @SETTINGS
    @given(case=broken_file(good, "config file"))
    def case(case):
        data, needle = case
        lines = run(capsys, sandbox, ["train"], data, "cfg.yaml")
        assert len(lines) == 1 and lines[0].startswith("error: cfg.yaml") and needle in lines[0], lines
        seen.add(_key(data, ["train"]))

    case()
    assert len(seen) >= MIN_CASES, len(seen)


# ------------------------------------------------------------------------------------------ search spaces
DIMS = {lf.key for lf in LEAVES} | set(S.ALIASES) | {S.VARIANT_KEY}  # what a space dimension may name
TOP_FIELDS = set(S.TOP_KEYS)


def _not_int(lo):
    return st.one_of(INTS, FLOATS, JUNK).filter(lambda v: v is not None and not (isinstance(v, int) and not isinstance(v, bool)
                                                         and lo <= v < 2**63))


def _not_number(lo_open):
    def ok(v):
        try:
            x = float(v) if not isinstance(v, bool) and isinstance(v, (int, float, str)) else None
        except (ValueError, OverflowError):
            x = None
        return x is not None and math.isfinite(x) and (x > 0 if lo_open else x >= 0)
    return st.one_of(FLOATS, INTS, JUNK).filter(lambda v: v is not None and not ok(v))


@st.composite
def space_mutation(draw):
    """(base document, mutations): one broken thing of a search space, at any level."""
    kind = draw(st.sampled_from(["top_unknown", "base", "name", "experiment", "description", "ints", "space_key",
                                 "space_spec", "space_values", "space_range", "search", "scheduler", "resources",
                                 "tags"]))
    doc = draw(st.sampled_from([SPACE, SPACE_RANDOM]))
    if kind == "top_unknown":
        k = draw(KEYS.filter(lambda k: k not in TOP_FIELDS))
        return doc, [Mutation((k,), draw(JUNK), f"{schema.show_key(k)}: unknown key")]
    if kind == "base":  # a train-config mutation inside base, or base itself not a mapping
        m = draw(st.one_of(MUTATION, st.builds(lambda v: Mutation((), v, ""), NOT_A_MAPPING)))
        return doc, [Mutation(("base",) + m.path, m.value, f"base.{m.needle}".rstrip(".") if m.path else "base: ")]
    if kind == "name":
        v = draw(JUNK.filter(lambda v: not (isinstance(v, str) and 0 < len(v) <= 200 and v not in (".", "..")
                                            and all(c.isascii() and (c.isalnum() or c in "_.-") for c in v))))
        return doc, [Mutation(("name",), v, "name: ")]
    if kind == "experiment":
        v = draw(JUNK.filter(lambda v: not (isinstance(v, str) and v.strip() and len(v) <= 500)))
        return doc, [Mutation(("experiment",), v, "experiment: ")]
    if kind == "description":
        return doc, [Mutation(("description",), draw(JUNK.filter(lambda v: v is not None and not isinstance(v, str))),
                              "description: ")]
    if kind == "ints":
        key, lo = draw(st.sampled_from([("max_concurrent", 1), ("max_failures", 0), ("repeat", 1)]))
        return doc, [Mutation((key,), draw(_not_int(lo)), f"{key}: ")]
    if kind == "space_key":
        k = draw(st.one_of(TEXT, st.sampled_from(["nr.trr", "modle.name", "train.epochs.x", "nr", "", "nr..tr"]))
                 .filter(lambda k: k not in DIMS and not k.startswith(("model.kwargs.", "tracking.tags."))))
        return doc, [Mutation(("space", k), [1], f"space.{schema.show_key(k)}")]
    if kind == "space_spec":
        v = draw(JUNK.filter(lambda v: not isinstance(v, list) and not (isinstance(v, dict) and len(v) == 1
                                                                          and next(iter(v)) in ("grid", "choice"))))
        return doc, [Mutation(("space", "nr.tr"), v, "space.nr.tr")]
    if kind == "space_values":
        leaf = draw(st.sampled_from([lf for lf in LEAVES if lf.base in (int, float, str, bool)]))
        bad = draw(JUNK.filter(lambda v: not accepted_type(leaf, v)))
        return dict(doc, space={leaf.key: [bad]}), [Mutation(("space", leaf.key), {"grid": [bad]}, f"space.{leaf.key}")]
    if kind == "space_range":
        kind_ = draw(st.sampled_from(["uniform", "loguniform", "randint"]))
        bounds = draw(st.lists(st.one_of(FLOATS, INTS, TEXT), min_size=0, max_size=3))
        lo_hi = [float(b) if isinstance(b, (int, float)) and not isinstance(b, bool) and abs(b) < 1e308 else None
                 for b in bounds]
        valid = (len(lo_hi) == 2 and None not in lo_hi and all(map(math.isfinite, lo_hi)) and lo_hi[0] < lo_hi[1]
                 and 0 < lo_hi[0] < 1 and 0 < lo_hi[1] < 1)
        assume(not valid)
        return dict(SPACE_RANDOM, space={}), [Mutation(("space", "nr.tr"), {kind_: bounds}, "space.nr.tr")]
    if kind == "search":
        v = draw(st.one_of(TEXT.filter(lambda s: s not in ("grid", "random", "optuna")),
                           st.builds(lambda k, v: {"type": "random", k: v}, KEYS.filter(
                               lambda k: k not in ("type", "sampler", "objectives", "seed")), JUNK),
                           st.builds(lambda v: {"type": "optuna", "objectives": v}, JUNK.filter(
                               lambda v: not isinstance(v, (dict, str)) and v is not None)),
                           st.builds(lambda v: {"type": "random", "seed": v}, _not_int(0)),
                           st.builds(lambda v: {"sampler": v}, JUNK)))
        return dict(doc, space={"nr.tr": [0.3]}), [Mutation(("search",), v, "search")]
    if kind == "scheduler":
        v = draw(st.one_of(TEXT.filter(lambda s: s not in ("fifo", "asha")),
                           st.builds(lambda k, v: {"type": "asha", k: v}, KEYS.filter(
                               lambda k: k not in ("type", "metric", "mode", "grace_period", "reduction_factor",
                                                   "max_t", "brackets")), JUNK),
                           st.builds(lambda k, v: {"type": "asha", k: v},
                                     st.sampled_from(["grace_period", "max_t", "brackets"]), _not_int(1)),
                           st.builds(lambda v: {"type": "asha", "reduction_factor": v},
                                     _not_number(True).filter(lambda v: not (isinstance(v, (int, float)) and v > 1))),
                           st.builds(lambda v: {"type": "asha", "metric": v}, TEXT)))
        return doc, [Mutation(("scheduler",), v, "scheduler")]
    if kind == "resources":
        v = draw(st.one_of(NOT_A_MAPPING,
                           st.builds(lambda v: {"cpu": v}, _not_number(True)),
                           st.builds(lambda v: {"cpu": 1, "gpu": v}, _not_number(False)),
                           st.builds(lambda k: {k: 1}, KEYS.filter(lambda k: k not in ("cpu", "gpu")))))
        return doc, [Mutation(("resources_per_trial",), v, "resources_per_trial")]
    v = draw(st.one_of(NOT_A_MAPPING,
                       st.builds(lambda k: {k: "x"}, st.sampled_from(["a!b", "", " ", "a/../b", "日本 #", "q?"])),
                       st.builds(lambda v: {"table": v}, JUNK.filter(lambda v: isinstance(v, (list, dict, bytes)))),
                       st.builds(lambda t: {"cell": t}, st.sampled_from(["{nope}", "{nr.tr:>99999}", "{method:q}",
                                                                         "{model.name:.5000f}", "{nr.tr:,d}"]))))
    return doc, [Mutation(("tags",), v, "tags")]


def test_fuzzed_search_spaces_are_refused(sandbox, capsys):
    seen: set = set()

    @settings(SETTINGS, max_examples=300 * SCALE)
    @given(case=space_mutation(), dry=st.booleans())
    def case(case, dry):
        doc, muts = case
        data = dump(apply(doc, muts))
        argv = ["sweep"] + (["--dry-run"] if dry else [])
        lines = run(capsys, sandbox, argv, data, "space.yaml")
        for m in muts:
            assert _named(lines, m.needle), (m.needle, lines)
        assert all(ln.startswith("error: space.yaml") for ln in lines), lines
        seen.add(_key(data, argv))

    case()
    assert len(seen) >= MIN_CASES, len(seen)


def test_fuzzed_search_space_overrides_are_refused(sandbox, capsys):
    """The search-space mutations of one top-level key, given as `--set KEY=VALUE` on a valid file."""
    seen: set = set()

    @SETTINGS
    @given(case=space_mutation().filter(lambda c: len(c[1]) == 1 and len(c[1][0].path) == 1
                                        and isinstance(c[1][0].path[0], str) and c[1][0].path[0].isidentifier()),
           dry=st.booleans())
    def case(case, dry):
        doc, (m,) = case
        value = set_value(m)
        argv = ["sweep", "--set", f"{m.path[0]}={value}"] + (["--dry-run"] if dry else [])
        lines = run(capsys, sandbox, argv, dump(doc), "space.yaml")
        assert _named(lines, m.needle.removesuffix(": ").rstrip()), (m.needle, lines)
        seen.add(_key(dump(doc), argv))

    case()
    assert len(seen) >= MIN_CASES, len(seen)


def test_fuzzed_search_space_files_are_refused(sandbox, capsys):
    seen: set = set()
    good = dump(SPACE_RANDOM)

    @settings(SETTINGS, max_examples=80 * SCALE)
    @given(case=broken_file(good, "search space file"))
    def case(case):
        data, needle = case
        lines = run(capsys, sandbox, ["sweep", "--dry-run"], data, "space.yaml")
        assert len(lines) == 1 and lines[0].startswith("error: space.yaml") and needle in lines[0], lines
        seen.add(_key(data, ["sweep"]))

    case()
    assert len(seen) >= MIN_CASES, len(seen)
