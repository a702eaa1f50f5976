"""Chat templates from untrusted model files, through a real server: sandbox escapes,
templates that raise, that are too large, that loop or grow without end, each a clean
400 with nothing executed and the server fine; an operator's template file, read on each
request."""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest

from tests.support.http import ServerFactory
from tests.support.openai_clients import TINY_CHAT, openai_client
from tests.support.server import RunningServer
from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE, TinyModelSpec, write_tiny_gguf

HELLO = [{"role": "user", "content": "hello world"}]
PWNED_NAME = "pwned-by-template"

HOSTILE = {
    "escape-mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "escape-globals": (
        "{{ cycler.__init__.__globals__.os.popen('touch PWNED').read() }}" + TINY_CHAT_TEMPLATE
    ),
    "escape-lipsum": "{{ lipsum.__globals__['os'].popen('touch PWNED').read() }}",
    "escape-mutate": "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    "raises": "{{ raise_exception('Conversation roles must alternate user/assistant') }}",
    "oversize": "{# " + "x" * 140_000 + " #}" + TINY_CHAT_TEMPLATE,
    "endless-loop": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    ),
    "doubling": (
        "{% set ns = namespace(s='a') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
    ),
    "huge-output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "huge-argument": "{{ 'x'|center(1000000000) }}",
}
EXPECTED = {
    "escape-mro": "forbids",
    "escape-globals": "forbids",
    "escape-lipsum": "forbids",
    "escape-mutate": "forbids",
    "raises": "Conversation roles must alternate user/assistant",
    "oversize": "at most 131072 are accepted",
    "endless-loop": "ran past",
    "doubling": "forbids",
    "huge-output": "rendered chat is over",
    "huge-argument": "forbids",
}


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    directory = tmp_path_factory.mktemp("hostile-templates")
    pwned = directory / PWNED_NAME
    for name, template in HOSTILE.items():
        spec = TinyModelSpec(seed=1, chat_template=template.replace("PWNED", str(pwned)))
        write_tiny_gguf(directory / f"{name}.gguf", spec)
    write_tiny_gguf(directory / TINY_CHAT, TinyModelSpec(seed=0, chat_template=TINY_CHAT_TEMPLATE))
    shutil.copyfile(tiny_model_dir / "tiny-a.gguf", directory / "tiny-a.gguf")
    return directory


@pytest.fixture(scope="module")
def server(hostile_dir: Path, module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(hostile_dir)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_template_is_a_clean_400(
    server: RunningServer, hostile_dir: Path, name: str
) -> None:
    client = openai_client(server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=f"{name}.gguf", messages=HELLO, max_tokens=4)
    assert caught.value.code == "chat_template_error"
    assert caught.value.param == "messages"
    assert EXPECTED[name] in caught.value.message
    assert not (hostile_dir / PWNED_NAME).exists()  # nothing ran
    # The model itself is fine: completions do not use the template.
    completion = client.completions.create(model=f"{name}.gguf", prompt="hello", max_tokens=2)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 2
    # And so is the server.
    assert server.process.poll() is None
    chat = client.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=2)
    assert chat.choices[0].finish_reason == "length"


def test_an_operators_template_file_is_read_on_each_request(
    start_server: ServerFactory, models_dir: Path, tmp_path: Path
) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    template = templates / "mine.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}|{% endfor %}A:")
    config = tmp_path / "modeld.toml"
    config.write_text('[models."tiny-a.gguf"]\nchat_template = "templates/mine.jinja"\n')
    server = start_server(models_dir, "--config", str(config))
    client = openai_client(server)

    def prompt_tokens() -> int:
        chat = client.chat.completions.create(model="tiny-a.gguf", messages=HELLO, max_tokens=1)
        assert chat.usage is not None
        return chat.usage.prompt_tokens

    first = prompt_tokens()
    template.write_text("{% for m in messages %}{{ m['content'] }} and the world|{% endfor %}A:")
    assert prompt_tokens() > first
    template.write_text("{{ raise_exception('edited into a refusal') }}")
    with pytest.raises(openai.BadRequestError, match="edited into a refusal"):
        prompt_tokens()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[models."no-such.gguf"]\npin = true\n', "no such model"),
        ('[models."tiny-a.gguf"]\nchat_template = "no-such-builtin"\n', "neither a llama.cpp"),
        ('[models."tiny-a.gguf"]\nchat_template = "missing.jinja"\n', "not a readable"),
        ('[models."tiny-a.gguf"]\nchat_template = "bad.jinja"\n', "not valid Jinja"),
        ('[models."tiny-a.gguf"]\ncolour = "blue"\n', "unknown field `colour`"),
        ('[models."tiny-a.gguf"]\ntemperature = 7\n', "temperature"),
        ('[models."a.gguf"]\naliases = ["x"]\n[models."b.gguf"]\naliases = ["x"]\n', "alias 'x'"),
    ],
    ids=["unknown-id", "unknown-builtin", "missing-file", "bad-jinja", "unknown-key",
         "bad-default", "shared-alias"],
)  # fmt: skip
def test_a_bad_models_table_stops_the_start(
    models_dir: Path, tmp_path: Path, table: str, message: str
) -> None:
    import subprocess
    import sys

    (tmp_path / "bad.jinja").write_text("{% if %}")
    config = tmp_path / "modeld.toml"
    config.write_text(table)
    started = subprocess.run(
        [sys.executable, "-m", "modeld.cli", "serve", "--models-dir", str(models_dir),
         "--config", str(config), "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert started.returncode == 2, started.stderr
    assert message in started.stderr
    named = table.split('"')[1]  # the first table's id
    assert f'"{named}"' in started.stderr or f"'{named}'" in started.stderr
