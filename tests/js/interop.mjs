// cashu-ts interop for the tests (tests/cashu_ts.py runs this with Node; see package.json).
//
//   node interop.mjs mint <mint-url> <amount>
//       mint <amount> sats at a FakeWallet mint (its invoices pay themselves);
//       prints {"proofs": [...]} as JSON, amounts as plain numbers.
//   node interop.mjs pay <mint-url> <creqA…> [amount]
//       mint enough, then pay the NUT-18 request with wallet.ops.sendToRequest, locked as its
//       nut10 asks; prints {"token": "cashuB…", "keep": n, "send": n} with the DLEQ proofs kept.
//
// Errors go to stderr with a non-zero exit.
import {
  Wallet,
  MintQuoteState,
  decodePaymentRequest,
  getEncodedToken,
} from '@cashu/cashu-ts';

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function loadWallet(mintUrl) {
  const wallet = new Wallet(mintUrl, { unit: 'sat' });
  await wallet.loadMint();
  return wallet;
}

async function mint(wallet, amount) {
  const quote = await wallet.createMintQuoteBolt11(amount);
  for (let i = 0; ; i++) {
    const state = await wallet.checkMintQuoteBolt11(quote.quote);
    if (state.state === MintQuoteState.PAID) break;
    if (i > 200) throw new Error(`mint quote ${quote.quote} never paid`);
    await sleep(50);
  }
  return wallet.mintProofsBolt11(amount, quote.quote);
}

const plain = (proofs) =>
  proofs.map((p) => ({ ...p, amount: Number(p.amount.toString()) }));

async function main([command, mintUrl, ...rest]) {
  const wallet = await loadWallet(mintUrl);
  if (command === 'mint') {
    const proofs = await mint(wallet, Number(rest[0]));
    return { proofs: plain(proofs) };
  }
  if (command === 'pay') {
    const request = decodePaymentRequest(rest[0]);
    const amount = rest[1] === undefined ? undefined : Number(rest[1]);
    const needed = Number((request.amount ?? amount).toString());
    // Enough to cover the amount and any input fees of the send's own swap.
    const proofs = await mint(wallet, needed + 64);
    const { keep, send } = await wallet.ops.sendToRequest(request, proofs, amount).run();
    const token = getEncodedToken({ mint: wallet.mint.mintUrl, proofs: send, unit: 'sat' });
    const sum = (ps) => ps.reduce((total, p) => total + Number(p.amount.toString()), 0);
    return { token, keep: sum(keep), send: sum(send) };
  }
  throw new Error(`unknown command ${command}: expected mint or pay`);
}

main(process.argv.slice(2)).then(
  (result) => {
    process.stdout.write(JSON.stringify(result) + '\n');
  },
  (error) => {
    process.stderr.write(`${error?.stack ?? error}\n`);
    process.exit(1);
  },
);
