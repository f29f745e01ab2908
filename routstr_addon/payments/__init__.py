"""Money in and out: tokens as keys, top-ups, refunds, x-cashu, Lightning invoices, payouts."""
