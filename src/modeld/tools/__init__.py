"""Tool calling below the HTTP layer: definitions and their checks, the formats a chat
template speaks, the grammars that enforce a call, and the streaming parser.

Pure Python and protocol-independent: an API adapter translates its wire shape into
:class:`Tool`/:data:`ToolChoice`, asks :func:`resolve_format` which format the model
speaks, passes :func:`forced_grammar` (``required``/a named function) or
:func:`lazy_grammar` (``auto``) to the engine as the request's grammar, and runs the
output through a :class:`ToolCallParser`.
"""

from modeld.tools.definitions import (
    MAX_TOOLS,
    FunctionCall,
    MessageToolCall,
    NamedToolChoice,
    Tool,
    ToolChoice,
    ToolFunction,
    check_tool_messages,
    check_tools,
    chosen_tools,
)
from modeld.tools.formats import (
    ToolFormat,
    detect_format,
    forced_grammar,
    lazy_grammar,
    resolve_format,
    trigger_matches,
)
from modeld.tools.parser import ContentDelta, Delta, ToolCallDelta, ToolCallParser, collect
from modeld.tools.prompt import generic_messages
from modeld.tools.schema import ArgumentRules, arguments_grammar

__all__ = [
    "MAX_TOOLS",
    "ArgumentRules",
    "ContentDelta",
    "Delta",
    "FunctionCall",
    "MessageToolCall",
    "NamedToolChoice",
    "Tool",
    "ToolCallDelta",
    "ToolCallParser",
    "ToolChoice",
    "ToolFormat",
    "ToolFunction",
    "arguments_grammar",
    "check_tool_messages",
    "check_tools",
    "chosen_tools",
    "collect",
    "detect_format",
    "forced_grammar",
    "generic_messages",
    "lazy_grammar",
    "resolve_format",
    "trigger_matches",
]
