"""Combining several fine-tunes of one base: merge math (`methods`), LoraHub's weight search (`lorahub`) and
`moedist merge --method ...` (`cli`)."""
