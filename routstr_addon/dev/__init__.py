"""For the demo and the tests only, never on the production path: an echo upstream and a
local FakeWallet mint."""
