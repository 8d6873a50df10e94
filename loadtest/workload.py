"""The benchmark workload: reproducible random prompts and the requests that carry them to a gateway or an engine."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.inference.v1 import inference_service_pb2 as inference_pb

# Short common words: the sim engine counts roughly one token per word, so N words make a prompt of about N
# tokens. Random draws from a few hundred words make any two prompts differ within the first KV block, so the
# prefix cache does not flatter the run.
_WORDS = (
    "the of and to in is was that for on with as by at from his her they this have had not are but which one "
    "you were all we she there been when their an who will more would if no out so said what up its about into "
    "than them can only other new some could time these two may then do first any my now such like our over man "
    "me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three place small found part home water room mother area money story "
    "fact month lot study book eye job word business issue side kind head house service friend father power hour "
    "game line end member law car city community name president team minute idea kid body information school face "
    "others level office door health person art war history party result change morning reason research girl guy "
    "moment air teacher force education foot boy age policy music market sense nation plan college interest death "
    "experience effect class control care field development role effort rate heart drug show leader light voice "
    "wife police mind price report decision son view relationship town road arm difference value building action "
    "model season society tax director position player record paper space ground form event official matter center"
).split()


@dataclass(frozen=True)
class Workload:
    """What every request of a run asks for; prompts are a function of (seed, stream, index) only, so a run is
    reproducible whatever order its requests finish in."""

    model: str = "sim-1b"
    prompt_tokens: int = 128
    max_tokens: int = 256
    seed: int = 0
    ignore_eos: bool = True

    def prompt(self, index: int, stream: str = "") -> str:
        """The prompt of request `index` of `stream` (about prompt_tokens words)."""
        rng = random.Random(f"{self.seed}:{stream}:{index}")
        return " ".join(rng.choices(_WORDS, k=self.prompt_tokens))

    def sampling(self) -> common_pb2.SamplingParams:
        return common_pb2.SamplingParams(max_tokens=self.max_tokens, ignore_eos=self.ignore_eos)

    def mesh_request(self, index: int, stream: str = "mesh") -> inference_pb.GenerateRequest:
        """InferenceService/Generate request (through the gateway)."""
        return inference_pb.GenerateRequest(
            model=self.model,
            prompt=self.prompt(index, stream),
            max_tokens=self.max_tokens,
            ignore_eos=self.ignore_eos,
        )

    def engine_request(self, index: int, stream: str = "direct") -> engine_pb.GenerateRequest:
        """EngineService/Generate request (straight to one engine, as the router would send it)."""
        spec = common_pb2.GenerationSpec(
            model=self.model, prompt=self.prompt(index, stream), sampling=self.sampling()
        )
        return engine_pb.GenerateRequest(
            request_id=f"bench-{uuid.uuid4().hex}",
            spec=spec,
            tenant_id="bench",
            cache_salt="bench",
        )
