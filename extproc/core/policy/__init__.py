"""Content policies (the `Policy` kind): word lists on requests and responses, request rules.

`engine` compiles policies per snapshot and applies them; `texts` is the seam that finds the
text in a body; `matching` finds phrases; `rules` is the table of request rules.
"""
