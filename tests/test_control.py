"""dgemma.control: constraint automata and the per-canvas DP, on tokenizers trained here (CPU, seconds)."""

import json
import re

import jsonschema
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from dgemma.control import INVALID, CompileLimits, Constraint, ConstraintError, ConstraintVocabulary
from dgemma.control.dp import best_valid_tokens
from dgemma.control.schema import SchemaError, schema_to_regex

EOS, PAD = "<eos>", "<pad>"
CORPUS = [
    '{"name": "Ada", "age": 36, "tags": ["math", "code"]}',
    '{"id": 7, "ok": true, "value": null, "score": -1.5e3}',
    '{"a": {"b": [1, 2, 3]}, "c": "x y z"}',
    "yes no maybe red green blue 0123456789",
    "The quick brown fox jumps over the lazy dog. café über naïve",
    '[{"k": "v"}, {"k": "w"}] {"nested": {"deep": {"deeper": 1}}}',
] * 4
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age"],
}
SEEDS = range(50)
# pydantic 2's schema of `pet: Cat | Dog = Field(discriminator="pet_type")` (Cat: pet_type "cat", meows: int; Dog:
# pet_type "dog", barks: float), as Owner.model_json_schema() writes it
TAGGED = {
    "$defs": {
        "Cat": {"properties": {"pet_type": {"const": "cat", "title": "Pet Type", "type": "string"},
                               "meows": {"title": "Meows", "type": "integer"}},
                "required": ["pet_type", "meows"], "title": "Cat", "type": "object"},
        "Dog": {"properties": {"pet_type": {"const": "dog", "title": "Pet Type", "type": "string"},
                               "barks": {"title": "Barks", "type": "number"}},
                "required": ["pet_type", "barks"], "title": "Dog", "type": "object"},
    },
    "properties": {"pet": {"discriminator": {"mapping": {"cat": "#/$defs/Cat", "dog": "#/$defs/Dog"},
                                             "propertyName": "pet_type"},
                           "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}], "title": "Pet"}},
    "required": ["pet"], "title": "Owner", "type": "object",
}


def byte_level_tokenizer(vocab_size: int = 420) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return ConstraintVocabulary.from_tokenizer(tokenizer, [tokenizer.token_to_id(EOS)], [tokenizer.token_to_id(PAD)])


def text_of(vocab: ConstraintVocabulary, tokens) -> str:
    """The text a canvas spells, up to the first EOS; checks that only EOS/pad follow it."""
    tokens = torch.as_tensor(tokens).tolist()
    ends = set(vocab.eos_token_ids) | set(vocab.pad_token_ids)
    cut = next((i for i, t in enumerate(tokens) if t in vocab.eos_token_ids), len(tokens))
    assert all(t in ends for t in tokens[cut:]), "only EOS/pad may follow EOS"
    return b"".join(vocab.token_bytes[t] for t in tokens[:cut]).decode("utf-8")


def random_log_probs(seed: int, canvas_length: int, vocab_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(canvas_length, vocab_size, generator=gen) * 4).log_softmax(-1)


# ---- vocabulary


def test_byte_level_token_bytes_spell_the_decoded_text(tokenizer, vocab):
    for text in ['{"name": "Ada"}', "café über naïve ☃ 日本", "a\tb\nc"]:
        ids = tokenizer.encode(text).ids
        assert b"".join(vocab.token_bytes[i] for i in ids).decode("utf-8") == tokenizer.decode(ids) == text
    assert vocab.token_bytes[tokenizer.token_to_id(EOS)] is None


def test_sentencepiece_style_tokens_spell_spaces_and_fallback_bytes():
    pieces = {"<unk>": 0, "<eos>": 1, "▁hi": 2, "<0xC3>": 3, "<0xA9>": 4, "a": 5}
    tok = Tokenizer(models.BPE(vocab=pieces, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken("<eos>", special=True), AddedToken("<unk>", special=True)])
    vocab = ConstraintVocabulary.from_tokenizer(tok, 1, [None], vocab_size=8)  # ids as generation configs give them
    assert vocab.token_bytes[:6] == (None, None, b" hi", b"\xc3", b"\xa9", b"a")
    assert vocab.vocab_size == 8 and vocab.token_bytes[6:] == (None, None)
    assert vocab.eos_token_ids == (1,) and vocab.pad_token_ids == ()


# ---- constraint automata


def test_regex_constraint_answers_from_any_state(tokenizer, vocab):
    c = Constraint.from_regex(r"-?[0-9]+", vocab)
    eos = vocab.eos_token_ids[0]
    assert not c.is_final(c.initial_state) and c.min_tokens_to_accept(c.initial_state) == 1
    assert not c.allowed_mask(c.initial_state)[eos]
    minus = c.next_state(c.initial_state, tokenizer.token_to_id("-"))
    assert minus != INVALID and not c.is_final(minus)
    seven = c.next_state(minus, tokenizer.token_to_id("7"))
    assert c.is_final(seven) and c.allowed_mask(seven)[eos]
    assert c.next_state(seven, tokenizer.token_to_id("-")) == INVALID
    done = c.next_state(seven, eos)
    assert done == c.done_state and c.is_final(done)
    assert c.allowed_tokens(done).tolist() == sorted([eos, vocab.pad_token_ids[0]])
    # every allowed token is one a full walk accepts
    for state in range(c.num_states):
        allowed = c.allowed_tokens(state)
        assert all(c.next_state(state, int(t)) != INVALID for t in allowed)


@pytest.mark.parametrize("pattern", [r"(red|green|blue)( [0-9]{1,3}){2}", schema_to_regex(PERSON), r"-?[0-9]+"])
def test_our_token_walk_accepts_what_outlines_index_accepts(vocab, pattern):
    """We take only the byte DFA from outlines and walk tokens ourselves (minimized, in classes): the allowed
    tokens and final states must match outlines' own token index along random walks."""
    from outlines_core import Index, Vocabulary
    spellings = {}
    for token_id, text in enumerate(vocab.token_bytes):
        if text:
            spellings.setdefault(text, []).append(token_id)
    theirs = Index(pattern, Vocabulary(vocab.vocab_size, spellings))  # its EOS id is outside the vocabulary
    ours = Constraint.from_regex(pattern, vocab)
    ends = {*vocab.eos_token_ids, *vocab.pad_token_ids}
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        state, their_state = ours.initial_state, theirs.get_initial_state()
        for _ in range(25):
            allowed = set(ours.allowed_tokens(state).tolist()) - ends
            assert allowed == set(theirs.get_allowed_tokens(their_state)) - {vocab.vocab_size}
            assert ours.is_final(state) == theirs.is_final_state(their_state)
            if not allowed:
                break
            token = sorted(allowed)[int(torch.randint(len(allowed), (1,), generator=gen))]
            state, their_state = ours.next_state(state, token), theirs.get_next_state(their_state, token)


def test_min_tokens_to_accept_is_the_shortest_tokenization(tokenizer, vocab):
    c = Constraint.from_regex("abcabc", vocab)
    # greedy tokenization is one spelling; the automaton knows the shortest, which is never longer
    assert 1 <= c.min_tokens_to_accept(c.initial_state) <= len(tokenizer.encode("abcabc").ids)
    states = c.walk(tokenizer.encode("abcabc").ids)
    assert (states != INVALID).all() and c.is_final(int(states[-1]))
    assert [c.min_tokens_to_accept(int(s)) for s in states][-1] == 0


def test_bad_inputs_raise_constraint_error(vocab):
    cases = [
        (lambda: Constraint.from_regex("(ab", vocab), "invalid regular expression"),
        (lambda: Constraint.from_json_schema({"type": "foo"}, vocab), "unknown type 'foo'"),
        (lambda: Constraint.from_json_schema({"type": "array", "minItems": 10**30}, vocab), "'minItems'"),
        (lambda: Constraint.from_json_schema({"oneOf": [{"type": "number"}, {"type": "integer"}]}, vocab),
         "'oneOf' whose members may overlap"),
        (lambda: Constraint.from_json_schema({"oneOf": [TAGGED["$defs"]["Cat"], TAGGED["$defs"]["Cat"]]}, vocab),
         "no value satisfies"),  # the same member twice: no value matches exactly one
        (lambda: Constraint.from_json_schema({"type": "object", "not": {"minProperties": 1}}, vocab), "'not'"),
        (lambda: Constraint.from_json_schema({"type": "string", "format": "uri", "pattern": "^git@"}, vocab),
         "'format' and 'pattern'"),
        (lambda: Constraint.from_json_schema({"type": "array", "contains": {"type": "integer"}}, vocab), "'contains'"),
        (lambda: Constraint.from_json_schema({"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/A"}}}, vocab),
         "recursive $ref"),
        (lambda: Constraint.from_json_schema({"type": "string", "pattern": "(?=a)b"}, vocab), "lookaround"),
        (lambda: Constraint.from_json_schema({"type": "string", "pattern": r"(a)\1"}, vocab), "backreference"),
        (lambda: Constraint.from_json_schema([1], vocab), "must be an object"),
        (lambda: Constraint.from_choice([], vocab), "non-empty list"),
        (lambda: Constraint.from_regex("a{40}", vocab, max_tokens=10), "max_tokens=10"),
        (lambda: Constraint.from_regex("[^\\x00-\\x{10FFFF}]", vocab), ""),
    ]
    for build, words in cases:
        with pytest.raises(ConstraintError) as info:
            build()
        message = str(info.value)
        assert words in message and "\n" not in message, message


def test_compile_limits(vocab):
    exploding = "(a|b)*a(a|b){12}"  # its DFA grows exponentially (2^14 states before minimizing)
    with pytest.raises(ConstraintError, match="needs 513 automaton states, more than the limit of 100"):
        Constraint.from_regex("[ab]*a[ab]{8}c", vocab, limits=CompileLimits(max_states=100))
    with pytest.raises(ConstraintError, match="longer than the limit of 0.5 s"):  # over 3 s here, 2026-12-07
        Constraint.from_regex("(a|b)*a(a|b){16}", vocab, limits=CompileLimits(timeout_s=0.5, max_states=10**7))
    with pytest.raises(ConstraintError, match="memory limit 100 MiB"):
        Constraint.from_regex(exploding, vocab, limits=CompileLimits(max_states=10**6, max_memory_mb=100))
    with pytest.raises(ConstraintError, match=r"token table needs 2 MiB \(7,502 states x 69 token classes\), more "
                                              r"than the limit of 1 MiB"):
        Constraint.from_regex("\\d{1,300}", vocab, limits=CompileLimits(max_table_mb=1))
    assert Constraint.from_regex("\\d{1,300}", vocab).nbytes < 3 * 2**20  # int32 tables: 2 MiB under the default
    with pytest.raises(ValueError):
        CompileLimits(max_states=0)
    with pytest.raises(ValueError):
        CompileLimits(max_table_mb=0)


def test_a_tagged_union_is_a_oneof_every_output_meets(vocab):
    """pydantic's discriminated union (oneOf over objects that each require `pet_type` with a const of its own) is
    compiled as anyOf, which is exact there: the DP's outputs validate against the schema, oneOf included."""
    constraint = Constraint.from_json_schema(TAGGED, vocab)
    kinds_seen = set()
    for seed in SEEDS:
        result = best_valid_tokens(random_log_probs(seed, 48, vocab.vocab_size), constraint, tokens_after=0)
        value = json.loads(text_of(vocab, result.tokens))
        jsonschema.validate(value, TAGGED)
        kinds_seen.add(value["pet"]["pet_type"])
    assert kinds_seen == {"cat", "dog"}


def test_schema_subset_rewrites():
    # annotations dropped, refs inlined, additionalProperties false means no keys
    regex = schema_to_regex({"title": "T", "$defs": {"N": {"type": "integer"}},
                             "type": "object", "properties": {"n": {"$ref": "#/$defs/N", "description": "d"}}})
    assert re.fullmatch(regex, '{"n":12}') and not re.fullmatch(regex, '{"n":"x"}')
    assert re.fullmatch(schema_to_regex({"type": "object", "additionalProperties": False}), "{}")
    assert re.fullmatch(schema_to_regex({"type": "string", "pattern": "^[a-z]+-[0-9]{2}$"}), '"ab-12"')
    # a pattern with length bounds is cut to them (tests/test_schema_patterns.py), or refused when it cannot be
    regex = schema_to_regex({"type": "string", "maxLength": 3, "pattern": "^a+$"})
    assert re.fullmatch(regex, '"aaa"') and not re.fullmatch(regex, '"aaaa"')
    with pytest.raises(SchemaError):
        schema_to_regex({"type": "string", "minLength": 3, "pattern": "^a$"})


# ---- the DP: every output satisfies its constraint


def kinds(vocab):
    choices = ["yes", "no", "maybe", "ça va"]
    return {
        "regex": (Constraint.from_regex(r"(red|green|blue)( [0-9]{1,3}){2}", vocab),
                  lambda text: re.fullmatch(r"(red|green|blue)( [0-9]{1,3}){2}", text)),
        "schema": (Constraint.from_json_schema(PERSON, vocab),
                   lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
        "object": (Constraint.json_object(vocab), lambda text: isinstance(json.loads(text), dict)),
        "choice": (Constraint.from_choice(choices, vocab), lambda text: text in choices),
    }


@pytest.fixture(scope="module")
def constraints(vocab):
    return kinds(vocab)


@pytest.mark.parametrize("kind", ["regex", "schema", "object", "choice"])
def test_dp_output_satisfies_the_constraint(kind, constraints, vocab):
    constraint, accepts = constraints[kind]
    canvas_length = 40
    for seed in SEEDS:
        log_probs = random_log_probs(seed, canvas_length, vocab.vocab_size)
        result = best_valid_tokens(log_probs, constraint, tokens_after=0)
        assert torch.equal(constraint.walk(result.tokens), result.states)
        assert constraint.is_final(int(result.states[-1]))
        text = text_of(vocab, result.tokens)
        assert accepts(text), (seed, text)
        assert result.log_prob == pytest.approx(float(log_probs.gather(1, result.tokens[:, None]).sum()))


@pytest.mark.parametrize("kind", ["schema", "object"])
def test_dp_carries_the_state_across_canvases(kind, constraints, vocab):
    constraint, accepts = constraints[kind]
    for seed in range(10):
        first = best_valid_tokens(random_log_probs(seed, 8, vocab.vocab_size), constraint)
        assert constraint.min_tokens_to_accept(int(first.states[-1])) < 10**6
        second = best_valid_tokens(random_log_probs(1000 + seed, 40, vocab.vocab_size), constraint,
                                   start_state=int(first.states[-1]), tokens_after=0)
        tokens = torch.cat([first.tokens, second.tokens])
        assert accepts(text_of(vocab, tokens))


def test_dp_respects_the_budget(vocab):
    constraint = Constraint.from_regex("a{6}", vocab)
    log_probs = random_log_probs(0, 2, vocab.vocab_size)
    with pytest.raises(ConstraintError, match="the rest of the output fits"):
        best_valid_tokens(log_probs, constraint, tokens_after=0)
    result = best_valid_tokens(log_probs, constraint, tokens_after=4)
    assert constraint.min_tokens_to_accept(int(result.states[-1])) <= 4


def test_dp_prefers_allowed_pins_and_survives_masked_tokens(tokenizer, vocab):
    constraint = Constraint.from_choice(["yes", "no"], vocab)
    log_probs = torch.full((4, vocab.vocab_size), float("-inf"))  # everything masked ...
    log_probs[0, tokenizer.token_to_id("n")] = 0.0  # ... except a pin that one spelling of "no" agrees with
    result = best_valid_tokens(log_probs, constraint, tokens_after=0)
    assert text_of(vocab, result.tokens) in ("yes", "no")
    assert int(result.tokens[0]) == tokenizer.token_to_id("n")


# ---- the DP equals brute force on a tiny vocabulary


@pytest.fixture(scope="module")
def tiny():
    pieces = ["a", "b", "ab", "{", "}", '"', ":", "1"]
    vocab = {EOS: 0, PAD: 1, **{p: i + 2 for i, p in enumerate(pieces)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS, special=True), AddedToken(PAD, special=True)])
    return ConstraintVocabulary.from_tokenizer(tok, [0], [1])


def brute_force(log_probs, constraint, start, tokens_after):
    """Best (score, tokens) over every allowed sequence, by exhaustive depth-first search."""
    canvas_length, vocab_size = log_probs.shape
    moves = [[(t, constraint.next_state(s, t)) for t in range(vocab_size)] for s in range(constraint.num_states)]
    moves = [[(t, n) for t, n in row if n != INVALID] for row in moves]
    values = log_probs.tolist()
    best = [float("-inf"), None]

    def search(c, state, score, tokens):
        if c == canvas_length:
            if (tokens_after is None or constraint.min_tokens_to_accept(state) <= tokens_after) and score > best[0]:
                best[:] = [score, list(tokens)]
            return
        for token, nxt in moves[state]:
            tokens.append(token)
            search(c + 1, nxt, score + values[c][token], tokens)
            tokens.pop()

    search(0, start, 0.0, [])
    return best


@pytest.fixture(params=[None, 0, 10**9], ids=["groups", "one-group-per-degree", "one-group"])
def group_cost(request, monkeypatch):
    """The DP's forward pass groups states by how many pairs lead into them (moves.Forward); the answer must not
    depend on the grouping. The layout is cached on each constraint: tests drop it before and after."""
    from dgemma.control import moves

    if request.param is not None:
        monkeypatch.setattr(moves, "GROUP_COST", request.param)


@pytest.mark.parametrize("pattern", [r'(ab|a|b)+1?', r'\{("(a|b)*":1)?\}', r'a*b*(ab)?'])
def test_dp_equals_brute_force(tiny, pattern, group_cost):
    constraint = Constraint.from_regex(pattern, tiny)
    constraint.forget("moves")
    try:
        check_dp_against_brute_force(constraint, tiny)
    finally:
        constraint.forget("moves")


def check_dp_against_brute_force(constraint, tiny):
    for seed in range(6):
        log_probs = random_log_probs(seed, 4, tiny.vocab_size).double()
        for tokens_after in (None, 0, 2):
            for start in (constraint.initial_state, constraint.num_states - 2):
                try:
                    result = best_valid_tokens(log_probs, constraint, start_state=start, tokens_after=tokens_after)
                except ConstraintError:
                    result = None
                score, tokens = brute_force(log_probs, constraint, start, tokens_after)
                if tokens is None:
                    assert result is None
                    continue
                assert result is not None and result.tokens.tolist() == tokens
                assert result.log_prob == pytest.approx(score, abs=1e-9)


def brute_completable(constraint, pinned, start, max_new):
    """completable_states by enumeration: from each state, is there a sequence for positions [start, max_new) that
    holds every pin there and ends in a final state?"""
    vocab_size = constraint.vocab_size

    def search(position, state):
        if position == max_new:
            return constraint.is_final(state)
        tokens = [pinned[position]] if position in pinned else range(vocab_size)
        for token in tokens:
            nxt = constraint.next_state(state, token)
            if nxt != INVALID and search(position + 1, nxt):
                return True
        return False

    return [search(start, s) for s in range(constraint.num_states)]


@pytest.mark.parametrize("pattern", [r'(ab|a|b)+1?', r'\{("(a|b)*":1)?\}', r'(aaaa|bbbb)1'])
def test_completable_states_equal_brute_force(tiny, pattern):
    """The states a canvas may end in so that the pins after it can still be met (and the text completed in
    budget), against enumeration, for pins of every token at several positions."""
    from dgemma.control.dp import completable_states

    constraint = Constraint.from_regex(pattern, tiny)
    rng = torch.Generator().manual_seed(0)
    cases = [({}, 0, 4), ({}, 2, 5)]
    for _ in range(12):
        positions = torch.randperm(5, generator=rng)[:int(torch.randint(1, 3, (1,), generator=rng))].tolist()
        pins = {p: int(torch.randint(0, tiny.vocab_size, (1,), generator=rng)) for p in positions}
        cases += [(pins, 0, 5), (pins, 1, 5), (pins, 2, 6)]
    outcomes = set()
    for pins, start, max_new in cases:
        got = completable_states(constraint, pins, start, max_new).tolist()
        assert got == brute_completable(constraint, pins, start, max_new), (pins, start, max_new)
        outcomes.add(got[constraint.initial_state])
    assert outcomes == {True, False}  # both kinds of pins were drawn


@pytest.mark.parametrize("pattern", [r'(ab|a|b)+1?', r'a*b*(ab)?', r'(aaaa|bbbb)1'])
def test_suffix_fits_equals_brute_force(tiny, pattern):
    from dgemma.control.dp import suffix_fits

    constraint = Constraint.from_regex(pattern, tiny)
    ids = {p: i + 2 for i, p in enumerate(["a", "b", "ab", "{", "}", '"', ":", "1"])}
    for suffix in (["1"], ["b"], ["a", "b"], ["ab", "1"], ["b", "1"]):
        suffix = [ids[t] for t in suffix]
        want = []
        for length in range(1, 5):
            pins = {length + j: t for j, t in enumerate(suffix)}
            want.append(brute_completable(constraint, pins, 0, length + len(suffix))[constraint.initial_state])
        assert suffix_fits(constraint, suffix, 4).tolist() == want, suffix


def test_dp_on_probabilities_equals_dp_on_log_probabilities(vocab):
    """The step hands the DP probabilities (no log pass over the canvas): the same tokens and states."""
    from dgemma.control.dp import best_valid_tokens

    constraint = Constraint.json_object(vocab)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        probs = torch.softmax(torch.randn(24, constraint.vocab_size, generator=g) * 4, dim=-1)
        probs[3] = 0.0
        probs[3, 7] = 1.0  # a one-hot row, as a pinned position
        a = best_valid_tokens(probs.log(), constraint, tokens_after=40)
        b = best_valid_tokens(probs, constraint, tokens_after=40, probs=True)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.states, b.states)
        assert abs(a.log_prob - b.log_prob) < 1e-6 * max(1.0, abs(a.log_prob))


def test_held_tokens_stay_even_when_completing_after_them_needs_improbable_tokens(tokenizer, vocab):
    """A settled or pinned token is kept by the step's DP even when keeping it means tokens the model gave
    probability 0 later (it was valid and completable when it settled). Here keeping "x" costs two zero-probability
    tokens ("b", "b") and dropping it one ("y"); the DP must keep it."""
    from types import SimpleNamespace

    from dgemma.control.dp import CanvasDP
    from dgemma.step import constrain_row as _constrain

    c = Constraint.from_regex("xbb|ycc", vocab)
    V, C_ = vocab.vocab_size, 4
    x, y, b, cc = (tokenizer.token_to_id(t) for t in "xybc")
    eos = vocab.eos_token_ids[0]
    probs = torch.zeros(C_, V)
    probs[0, y], probs[1, cc], probs[2, cc], probs[3, eos] = 1.0, 1.0, 1.0, 1.0
    held = torch.tensor([True, False, False, False])
    state = SimpleNamespace(pinned=torch.zeros(1, C_, dtype=torch.bool), pin_values=torch.zeros(1, C_, dtype=torch.long),
                            positions=torch.arange(C_), num_settled=torch.tensor([1]),
                            argmax=torch.tensor([[x, b, b, eos]]),
                            constraints=[CanvasDP(c, c.initial_state, c.final.numpy())])
    argmax, sampled = _constrain(state, 0, probs, torch.tensor([y, cc, cc, eos]), ~held)
    assert argmax.tolist() == [x, b, b, eos] and sampled.tolist()[1:] == [b, b, eos]
    state.pinned, state.pin_values, state.num_settled = held[None], state.argmax.clone(), torch.tensor([0])
    assert _constrain(state, 0, probs, torch.tensor([y, cc, cc, eos]), ~held)[0].tolist() == [x, b, b, eos]


def test_a_valid_draw_is_kept_and_an_invalid_one_projected(tokenizer, vocab):
    """The argmax is the most probable valid canvas; the sample keeps each draw the constraint allows (here "b",
    less probable than "a" at position 0) and moves only the draws it forbids ("x" at position 1)."""
    from types import SimpleNamespace

    from dgemma.control.dp import CanvasDP
    from dgemma.step import constrain_row as _constrain

    c = Constraint.from_regex("[ab]{3}", vocab)
    V, C_ = vocab.vocab_size, 4
    a, b, x = (tokenizer.token_to_id(t) for t in "abx")
    eos = vocab.eos_token_ids[0]
    probs = torch.zeros(C_, V)
    probs[0, a], probs[0, b] = 0.6, 0.4
    probs[1, x], probs[1, b], probs[1, a] = 0.5, 0.3, 0.2
    probs[2, a], probs[3, eos] = 1.0, 1.0
    state = SimpleNamespace(pinned=torch.zeros(1, C_, dtype=torch.bool), pin_values=torch.zeros(1, C_, dtype=torch.long),
                            positions=torch.arange(C_), num_settled=torch.tensor([0]), argmax=torch.zeros(1, C_, dtype=torch.long),
                            constraints=[CanvasDP(c, c.initial_state, c.final.numpy())])
    accepted = torch.tensor([True, True, True, True])
    argmax, sampled = _constrain(state, 0, probs, torch.tensor([b, b, a, eos]), accepted)
    assert argmax.tolist() == [a, b, a, eos] and sampled.tolist() == [b, b, a, eos]  # valid draws stay
    argmax, sampled = _constrain(state, 0, probs, torch.tensor([b, x, a, eos]), accepted)
    assert sampled.tolist() == [b, b, a, eos]  # "x" is projected to the likeliest allowed token; "b" at 0 stays
    assert _constrain(state, 0, probs, None, accepted)[1].tolist() == [a, b, a, eos]  # greedy: the argmax


def test_lanes_of_one_forward_pass_equal_solves_on_their_own(vocab):
    """A sampled step solves for the argmax and for the draws preferred as two lanes of one forward pass
    (solve_each); each lane's answer equals the same solve alone, on a fresh read."""
    from dgemma.control.dp import class_scores, completable_states, solve, solve_each

    c = Constraint.from_json_schema(PERSON, vocab)
    C_ = 40
    ends = completable_states(c, {}, C_, 2 * C_, eos=True)
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        probs = torch.softmax(torch.randn(C_, c.vocab_size, generator=g) * 3, -1)
        read = class_scores(probs, c, probs=True)
        held = torch.where(torch.arange(C_) < 2 * seed, solve(read, None, end_states=ends).tokens, -1)
        for prefer_from in (C_, 30, 7, 0):
            drawn = torch.randint(0, c.vocab_size, (C_,), generator=g)
            prefer = torch.where((torch.arange(C_) >= prefer_from) & (torch.rand(C_, generator=g) < 0.5), drawn, -1)
            for hard in (None, held):
                lanes = solve_each(read, [None, prefer, prefer], None, hard, ends)
                for got, steer in zip(lanes, (None, prefer, prefer)):
                    want = solve(class_scores(probs, c, probs=True), None, hard=hard, prefer=steer, end_states=ends)
                    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.states, want.states)
                    assert got.log_prob == want.log_prob
