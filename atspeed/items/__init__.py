"""Item identifiers: the index (item -> code tokens), semantic-id construction and the prefix trie."""
