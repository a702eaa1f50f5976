"""Real chat templates and a conversation, for tests and benchmarks."""

from __future__ import annotations

from modeld.types import ChatMessage

__all__ = ["CONVERSATION", "GEMMA3"]

CONVERSATION = [
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "What is the capital of France?"),
    ChatMessage("assistant", "Paris."),
    ChatMessage("user", "And of Italy?"),
]
# The official Gemma 3 template (tokenizer_config.json of google/gemma-3-270m-it).
GEMMA3 = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- if messages[0]['content'] is "
    "string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- else -%}{%- "
    "set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}{%- set "
    'loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = "" -%}{%- set '
    "loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}{%- if "
    "(message['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception(\"Conversation "
    'roles must alternate user/assistant/user/assistant/...") }}{%- endif -%}{%- if '
    "(message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}{%- set role = "
    "message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if "
    "loop.first else \"\") }}{%- if message['content'] is string -%}{{ message['content'] | trim "
    "}}{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}{%- if "
    "item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}{{ "
    "item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- else -%}{{ raise_exception(\"Invalid "
    "content type\") }}{%- endif -%}{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if "
    "add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
