"""`shardmesh generate` (shardmesh/cli_generate.py) in-process against the fake router."""

import argparse
import json

import pytest

from fake_router import FakeRouter
from shardmesh import cli_generate


@pytest.fixture(scope="module")
def router():
    with FakeRouter() as router:
        yield router


def generate(capsys, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="shardmesh")
    cli_generate.add_parser(parser.add_subparsers(dest="command"))
    code = cli_generate.run(parser.parse_args(["generate", *argv]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prompt_ids_print_ids(router, capsys):
    code, out, err = generate(capsys, "--router", router.address, "--prompt-ids", "1, 2", "--max-new-tokens", "3")
    assert code == 0 and out == "3 4 5 \n"
    assert err.startswith("[finish_reason=length prompt_tokens=2 new_tokens=3 ")


def test_text_prompt_prints_text_and_sends_sampling_flags(router, capsys):
    code, out, _ = generate(capsys, "--router", router.address, "--prompt", "hey", "--temperature", "0.5",
                            "--top-k", "4", "--top-p", "0.8", "--seed", "7", "--stop-token-ids", "5,9")
    assert code == 0 and out == "t4 t5 \n"
    sampling = router.servicer.requests[-1].sampling
    assert (sampling.top_k, sampling.seed) == (4, 7) and sampling.top_p == pytest.approx(0.8)


def test_jsonl_output(router, capsys):
    code, out, _ = generate(capsys, "--router", router.address, "--prompt-ids", "1", "--max-new-tokens", "2",
                            "--output", "jsonl")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [line["token_id"] for line in lines] == [2, 3] and lines[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("prompt, message", [
    ("abort:INVALID_ARGUMENT", "shardmesh generate: INVALID_ARGUMENT: fake INVALID_ARGUMENT for this prompt\n"),
    ("abort:UNAVAILABLE:1", "shardmesh generate: UNAVAILABLE: fake UNAVAILABLE after 1 tokens\n"),
])
def test_errors_exit_non_zero_with_one_line(router, capsys, prompt, message):
    code, out, err = generate(capsys, "--router", router.address, "--prompt", prompt, "--max-new-tokens", "3")
    assert code == 1 and err == message
    assert out == ("" if ":1" not in prompt else f"t{len(prompt) + 1} \n")  # what arrived stays printed


def test_deadline_and_wait_serving(router, capsys):
    code, _, err = generate(capsys, "--router", router.address, "--prompt", "hang", "--timeout", "0.2")
    assert code == 1 and err.startswith("shardmesh generate: DEADLINE_EXCEEDED")
    router.servicer.serving_after = router.servicer.status_calls + 1
    code, out, _ = generate(capsys, "--router", router.address, "--prompt-ids", "1", "--max-new-tokens", "1",
                            "--wait-serving", "5")
    assert code == 0 and out == "2 \n"


def test_bad_prompt_ids_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        generate(capsys, "--router", "127.0.0.1:1", "--prompt-ids", "1,x")
    assert info.value.code == 2 and "comma-separated integers" in capsys.readouterr().err
