# pragma version ^0.4.0
"""
@title Cocoon settlement
@notice Client escrow, reservations of it per server, server stakes, redemption of EIP-712 cumulative
        vouchers, and slashing of a server's stake on a fraud verdict signed by a threshold of registered
        verifiers.
        A reservation says "set aside up to `total` of my escrow, in all, for server on channel"; anyone may
        submit it (the server does before giving credit), and it moves escrow into that channel at once.
        A voucher says "client owes server `total_amount` in all on channel `channel`"; redeeming pays
        only the increase over what that channel was already paid, from that channel's reservation alone.
        So every wei a server is paid was set aside for it: servers sharing one escrow cannot all be owed it.
        A client takes back what a channel still holds by a release request that matures like a withdrawal.
        Withdrawal and unstake requests mature after `withdrawal_delay` and lapse `request_window` later,
        so a request made long ago cannot be used to front-run a redemption or a slash at any moment; a
        server with a pending unstake cannot redeem (it stays slashable until it leaves). Slashed funds
        not paid to the reporter go to the owner-set treasury destination.
"""

struct Voucher:
    client: address
    server: address
    channel: uint256
    total_units: uint256
    total_amount: uint256

struct Reservation:
    client: address
    server: address
    channel: uint256
    total: uint256

event Deposited:
    client: indexed(address)
    amount: uint256
    escrow: uint256

event WithdrawalRequested:
    client: indexed(address)
    amount: uint256
    available_at: uint256

event Withdrawn:
    client: indexed(address)
    amount: uint256

event Staked:
    server: indexed(address)
    amount: uint256
    stake: uint256

event UnstakeRequested:
    server: indexed(address)
    available_at: uint256

event Unstaked:
    server: indexed(address)
    amount: uint256

event Redeemed:
    client: indexed(address)
    server: indexed(address)
    channel: uint256
    amount: uint256
    total_paid: uint256

event Reserved:
    client: indexed(address)
    server: indexed(address)
    channel: uint256
    amount: uint256
    reserved: uint256

event ReleaseRequested:
    client: indexed(address)
    server: indexed(address)
    channel: uint256
    available_at: uint256

event Released:
    client: indexed(address)
    server: indexed(address)
    channel: uint256
    amount: uint256

event VerifierAdded:
    verifier: indexed(address)

event TreasurySwept:
    destination: indexed(address)
    amount: uint256

event Slashed:
    server: indexed(address)
    evidence: bytes32
    amount: uint256
    reporter: address
    reward: uint256

VOUCHER_TYPEHASH: constant(bytes32) = keccak256(
    "Voucher(address client,address server,uint256 channel,uint256 totalUnits,uint256 totalAmount)")
RESERVATION_TYPEHASH: constant(bytes32) = keccak256(
    "Reservation(address client,address server,uint256 channel,uint256 total)")
VERDICT_TYPEHASH: constant(bytes32) = keccak256(
    "Verdict(address server,bytes32 evidence,address reporter,uint256 deadline)")
DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
# secp256k1n / 2: a larger s is the malleated twin of a valid signature
HALF_N: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168
MAX_VERIFIER_SIGNATURES: constant(uint256) = 32
REPORTER_SHARE_PERCENT: constant(uint256) = 50

owner: public(address)
withdrawal_delay: public(uint256)
request_window: public(uint256)
min_stake: public(uint256)
verdict_threshold: public(uint256)

escrow: public(HashMap[address, uint256])
withdrawal_amount: public(HashMap[address, uint256])
withdrawal_time: public(HashMap[address, uint256])
stake: public(HashMap[address, uint256])
unstake_time: public(HashMap[address, uint256])
paid: public(HashMap[bytes32, uint256])           # keccak(client, server, channel) -> total paid
reserved: public(HashMap[bytes32, uint256])       # channel key -> escrow set aside for its server, not yet paid
reserved_total: public(HashMap[bytes32, uint256]) # channel key -> all ever set aside (what reservations count)
release_time: public(HashMap[bytes32, uint256])   # channel key -> when the client may take it back (0: held)
is_verifier: public(HashMap[address, bool])
used_evidence: public(HashMap[bytes32, bool])
treasury: public(uint256)
treasury_destination: public(address)


@deploy
def __init__(withdrawal_delay: uint256, min_stake: uint256, verdict_threshold: uint256, request_window: uint256):
    assert verdict_threshold > 0, "threshold must be positive"
    assert request_window > 0, "request window must be positive"
    self.owner = msg.sender
    self.treasury_destination = msg.sender
    self.withdrawal_delay = withdrawal_delay
    self.request_window = request_window
    self.min_stake = min_stake
    self.verdict_threshold = verdict_threshold


@view
@internal
def _domain_separator() -> bytes32:
    return keccak256(abi_encode(DOMAIN_TYPEHASH, keccak256("Cocoon"), keccak256("1"), chain.id, self))


@view
@external
def domain_separator() -> bytes32:
    return self._domain_separator()


@view
@internal
def _recover(digest: bytes32, signature: Bytes[65]) -> address:
    assert len(signature) == 65, "signature must be 65 bytes"
    r: uint256 = extract32(signature, 0, output_type=uint256)
    s: uint256 = extract32(signature, 32, output_type=uint256)
    v: uint256 = convert(slice(signature, 64, 1), uint256)
    assert v == 27 or v == 28, "bad signature v"
    assert s <= HALF_N, "malleable signature"
    signer: address = ecrecover(digest, v, r, s)
    assert signer != empty(address), "invalid signature"
    return signer


@view
@internal
def _voucher_digest(v: Voucher) -> bytes32:
    struct_hash: bytes32 = keccak256(abi_encode(VOUCHER_TYPEHASH, v.client, v.server, v.channel, v.total_units,
                                                v.total_amount))
    return keccak256(concat(b"\x19\x01", self._domain_separator(), struct_hash))


@view
@internal
def _key(client: address, server: address, channel: uint256) -> bytes32:
    return keccak256(abi_encode(client, server, channel))


@view
@external
def backing(client: address, server: address, channel: uint256) -> uint256:
    """What vouchers on this channel can still be paid from: its reservation, or 0 while a release is pending."""
    key: bytes32 = self._key(client, server, channel)
    if self.release_time[key] != 0:
        return 0
    return self.reserved[key]


@view
@external
def channel_key(client: address, server: address, channel: uint256) -> bytes32:
    return self._key(client, server, channel)


# ---------------------------------------------------------------- clients
@payable
@external
def deposit():
    self.escrow[msg.sender] += msg.value
    log Deposited(client=msg.sender, amount=msg.value, escrow=self.escrow[msg.sender])


@external
def request_withdrawal(amount: uint256):
    """Funds stay redeemable by servers until the delay has passed; the request lapses request_window later."""
    assert amount > 0 and amount <= self.escrow[msg.sender], "amount exceeds escrow"
    self.withdrawal_amount[msg.sender] = amount
    self.withdrawal_time[msg.sender] = block.timestamp + self.withdrawal_delay
    log WithdrawalRequested(client=msg.sender, amount=amount, available_at=block.timestamp + self.withdrawal_delay)


@external
def withdraw():
    assert self.withdrawal_amount[msg.sender] > 0, "no withdrawal requested"
    assert block.timestamp >= self.withdrawal_time[msg.sender], "withdrawal delay has not passed"
    assert block.timestamp <= self.withdrawal_time[msg.sender] + self.request_window, \
        "withdrawal request lapsed: request again"
    amount: uint256 = min(self.withdrawal_amount[msg.sender], self.escrow[msg.sender])
    self.withdrawal_amount[msg.sender] = 0
    self.escrow[msg.sender] -= amount
    send(msg.sender, amount)
    log Withdrawn(client=msg.sender, amount=amount)


@external
def reserve(r: Reservation, signature: Bytes[65]) -> uint256:
    """Move escrow into the channel, up to the cumulative total the client signed (as much as the escrow
    holds; the rest when it holds more). Returns the amount moved."""
    struct_hash: bytes32 = keccak256(abi_encode(RESERVATION_TYPEHASH, r.client, r.server, r.channel, r.total))
    digest: bytes32 = keccak256(concat(b"\x19\x01", self._domain_separator(), struct_hash))
    assert self._recover(digest, signature) == r.client, "reservation not signed by its client"
    key: bytes32 = self._key(r.client, r.server, r.channel)
    assert self.release_time[key] == 0, "the client is releasing this channel's reservation"
    already: uint256 = self.reserved_total[key]
    assert r.total > already, "reservation already applied"
    amount: uint256 = min(r.total - already, self.escrow[r.client])
    assert amount > 0, "client escrow is empty"
    self.escrow[r.client] -= amount
    self.reserved[key] += amount
    self.reserved_total[key] = already + amount
    log Reserved(client=r.client, server=r.server, channel=r.channel, amount=amount, reserved=self.reserved[key])
    return amount


@external
def request_release(server: address, channel: uint256):
    """Stop new credit on the channel; its server may still redeem until the delay has passed."""
    key: bytes32 = self._key(msg.sender, server, channel)
    assert self.reserved[key] > 0, "nothing reserved on this channel"
    self.release_time[key] = block.timestamp + self.withdrawal_delay
    log ReleaseRequested(client=msg.sender, server=server, channel=channel,
                         available_at=block.timestamp + self.withdrawal_delay)


@external
def release(server: address, channel: uint256):
    """Return what the channel still holds to the client's escrow."""
    key: bytes32 = self._key(msg.sender, server, channel)
    assert self.release_time[key] != 0, "no release requested"
    assert block.timestamp >= self.release_time[key], "release delay has not passed"
    assert block.timestamp <= self.release_time[key] + self.request_window, "release request lapsed: request again"
    amount: uint256 = self.reserved[key]
    self.reserved[key] = 0
    self.release_time[key] = 0
    self.escrow[msg.sender] += amount
    log Released(client=msg.sender, server=server, channel=channel, amount=amount)


# ---------------------------------------------------------------- servers
@payable
@external
def register():
    """Stake (more) to serve; vouchers are redeemable only by servers holding at least min_stake."""
    self.stake[msg.sender] += msg.value
    self.unstake_time[msg.sender] = 0
    log Staked(server=msg.sender, amount=msg.value, stake=self.stake[msg.sender])


@external
def request_unstake():
    assert self.stake[msg.sender] > 0, "nothing staked"
    self.unstake_time[msg.sender] = block.timestamp + self.withdrawal_delay
    log UnstakeRequested(server=msg.sender, available_at=block.timestamp + self.withdrawal_delay)


@external
def unstake():
    assert self.unstake_time[msg.sender] != 0, "no unstake requested"
    assert block.timestamp >= self.unstake_time[msg.sender], "unstake delay has not passed"
    assert block.timestamp <= self.unstake_time[msg.sender] + self.request_window, "unstake request lapsed: request again"
    amount: uint256 = self.stake[msg.sender]
    assert amount > 0, "nothing staked"
    self.stake[msg.sender] = 0
    self.unstake_time[msg.sender] = 0
    send(msg.sender, amount)
    log Unstaked(server=msg.sender, amount=amount)


@external
def redeem(v: Voucher, signature: Bytes[65]) -> uint256:
    """Pay the server the increase of this voucher over what its channel was paid; returns the payment."""
    assert self.stake[v.server] >= self.min_stake and self.stake[v.server] > 0, "server is not registered"
    assert self.unstake_time[v.server] == 0, "server is unstaking: it cannot redeem (register again to cancel)"
    assert self._recover(self._voucher_digest(v), signature) == v.client, "voucher not signed by its client"
    key: bytes32 = self._key(v.client, v.server, v.channel)
    already: uint256 = self.paid[key]
    assert v.total_amount > already, "voucher already redeemed"
    payment: uint256 = min(v.total_amount - already, self.reserved[key])
    assert payment > 0, "nothing reserved on this channel"
    self.paid[key] = already + payment
    self.reserved[key] -= payment
    send(v.server, payment)
    log Redeemed(client=v.client, server=v.server, channel=v.channel, amount=payment, total_paid=already + payment)
    return payment


# ---------------------------------------------------------------- fraud
@external
def add_verifier(verifier: address):
    assert msg.sender == self.owner, "only the owner adds verifiers"
    self.is_verifier[verifier] = True
    log VerifierAdded(verifier=verifier)


@external
def set_treasury_destination(destination: address):
    assert msg.sender == self.owner, "only the owner sets the treasury destination"
    assert destination != empty(address), "destination must be an address"
    self.treasury_destination = destination


@external
def sweep_treasury():
    """Anyone may send the treasury (slashed stakes less reporters' rewards) to its destination."""
    amount: uint256 = self.treasury
    assert amount > 0, "treasury is empty"
    self.treasury = 0
    send(self.treasury_destination, amount)
    log TreasurySwept(destination=self.treasury_destination, amount=amount)


@external
def slash(server: address, evidence: bytes32, reporter: address, deadline: uint256,
          signatures: DynArray[Bytes[65], MAX_VERIFIER_SIGNATURES]):
    """Signatures of distinct verifiers, in ascending signer order, over
    Verdict(server, evidence, reporter, deadline); valid until the deadline."""
    assert block.timestamp <= deadline, "verdict expired"
    assert not self.used_evidence[evidence], "evidence already used"
    struct_hash: bytes32 = keccak256(abi_encode(VERDICT_TYPEHASH, server, evidence, reporter, deadline))
    digest: bytes32 = keccak256(concat(b"\x19\x01", self._domain_separator(), struct_hash))
    previous: address = empty(address)
    for signature: Bytes[65] in signatures:
        signer: address = self._recover(digest, signature)
        assert self.is_verifier[signer], "signer is not a verifier"
        assert convert(signer, uint256) > convert(previous, uint256), "signers must be distinct and sorted"
        previous = signer
    assert len(signatures) >= self.verdict_threshold, "too few verifier signatures"
    amount: uint256 = self.stake[server]
    assert amount > 0, "nothing to slash"
    self.used_evidence[evidence] = True
    self.stake[server] = 0
    reward: uint256 = amount * REPORTER_SHARE_PERCENT // 100
    self.treasury += amount - reward
    send(reporter, reward)
    log Slashed(server=server, evidence=evidence, amount=amount, reporter=reporter, reward=reward)
