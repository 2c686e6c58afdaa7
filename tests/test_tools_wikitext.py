"""Wikitext to plain text, redirect targets, and the token budget."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tools.wikitext import TextBudget, plain_text, redirect_target

ARTICLE = """{{Infobox city|name=Paris|population=2,100,000}}
'''Paris''' is the capital of [[France]].<ref>{{cite web|url=https://example.org|title=Source}}</ref> It has
[[Eiffel Tower|a tower]].<!-- hidden note -->
[[File:Paris.jpg|thumb|A caption about [[Seine]]]]

== History {{efn|a note}} ==
Founded in the [[3rd century BC]].<ref name="a"/>
=== Modern era ===
* Item one
* Item two
<gallery>
Paris.jpg|Picture
</gallery>
{{Navbox|Cities}}
[[Category:Capitals]]
"""


def test_plain_text_keeps_prose_and_headings_drops_markup():
    text = plain_text(ARTICLE)
    assert text.startswith("Paris is the capital of France. It has\na tower.")
    assert "== History ==" in text and "=== Modern era ===" in text
    assert "Item one\nItem two" in text
    for gone in ("Infobox", "2,100,000", "cite", "example.org", "hidden note", "caption", "Seine", "Picture",
                 "Navbox", "Capitals", "efn", "{{", "[[", "<ref", "'''"):
        assert gone not in text, gone
    assert "\n\n\n" not in text


@pytest.mark.parametrize("wikitext, target", [
    ("#REDIRECT [[Elon Musk]]", "Elon Musk"),
    ("#redirect[[Elon Musk#Twitter]]\n{{R from move}}", "Elon Musk"),
    ("  #Redirect [[:Elon Musk|label]]", "Elon Musk"),
    ("'''Elon Musk''' is a businessman. #REDIRECT [[X]]", None),
    ("#REDIRECT", None),
    ("See [[Elon Musk]]", None),
])
def test_redirect_target(wikitext, target):
    assert redirect_target(wikitext) == target


def test_budget_without_tokenizer_counts_four_characters_a_token():
    budget = TextBudget(16)
    assert budget.cut("x" * 64) == ("x" * 64, False)
    assert budget.cut("x" * 65) == ("x" * 64, True)


def test_budget_cuts_at_a_token_boundary_of_the_tokenizer(tmp_path):
    vocab = {"[UNK]": 0, **{w: i for i, w in enumerate(["alpha", "beta", "gamma", "delta", ","], 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    budget = TextBudget(3, str(tmp_path))
    assert budget.cut("alpha beta, gamma delta") == ("alpha beta,", True)
    assert budget.cut("alpha beta gamma") == ("alpha beta gamma", False)
