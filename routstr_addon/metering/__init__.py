"""The request path's money rules, free of mitmproxy and of Cashu: price, reserve, read
usage, settle, sweep."""
