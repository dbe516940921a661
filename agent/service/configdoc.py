"""What each config table and key is for: one sentence each, for docs/config.md.

agent/service/configref.py takes the keys, types, defaults and ranges from the parsers and the
sentences from here; it refuses a key the parsers read that is missing here, and an entry here
that no parser reads. Section ids: ``sensor[]`` is ``[[sensor]]``, ``sensor[].options@adxl345`` is
``[sensor.options]`` of an ADXL345, ``<>`` stands for a name chosen in the config (see
:data:`PLACEHOLDERS`).
"""

from __future__ import annotations

#: Names shown for the keys of tables of named entries.
PLACEHOLDERS: dict[str, str] = {
    "sensor[].signals": "CHANNEL",
    "sensor[].resolution": "CHANNEL",
    "sensor[].scaling": "CHANNEL",
    "sensor[].options@line.rename": "WIRE_KEY",
    "sensor[].options@line.resolution": "CHANNEL",
    "detect.inputs": "MODEL_CHANNEL",
}

#: Types the parsers cannot say (keys they read raw and check themselves).
TYPES: dict[str, str] = {
    "sensor[].bus": 'integer or `"sim"`',
    "sensor[].address": "integer",
    "link.high.max_inflight": "integer",
    "link.medium.max_inflight": "integer",
    "link.low.max_inflight": "integer",
    "link.offline.max_inflight": "integer",
    "data.policy": "table of strings",
    "data.high.policy": "table of strings",
    "data.medium.policy": "table of strings",
    "data.low.policy": "table of strings",
    "data.offline.policy": "table of strings",
}

_POLICY = (
    "What the uplink does while the link monitor classifies the link as {state} "
    "(agent/sync/link.py, docs/link.md); every key defaults to the built-in policy of {state}."
)

_DATA = (
    "The policy while the link is {state}: `raw` or `features` per channel, over `[data]`'s "
    "(a `local` or `drop` channel stays so at every level)."
)

SECTIONS: dict[str, str] = {
    "agent": "The device: its identity, where it keeps its data, how much it logs. Required.",
    "store": (
        "The durable store-and-forward queue (SQLite, WAL): every reading and alert waits here "
        "until the endpoint acknowledges it (docs/store.md)."
    ),
    "metrics": (
        "The Prometheus textfile the agent rewrites for node_exporter's textfile collector."
    ),
    "uplink": (
        "The cloud endpoint records go to, and how (agent/sync/uplink.py, docs/protocol.md). "
        "Without this table nothing leaves the device: the agent says so at start and every "
        "ten minutes. With it but without the credential file, the same, with the command "
        "that registers the device."
    ),
    "state": (
        "Reported and desired device state over the uplink (docs/protocol.md, 'State'); used "
        "with `[uplink]`."
    ),
    "models": (
        "The cache of models assigned through desired state, downloaded from the endpoint's "
        "signed registry (agent/modelstore/)."
    ),
    "update": (
        "Signed agent releases (docs/ota.md): where the A/B releases live and the key that "
        "signs them. Without this table `agent/version` in desired state is refused."
    ),
    "logs": (
        "The ring of recent log lines kept in memory, which the `logs` remote command uploads "
        "(agent/service/logring.py, docs/ops.md)."
    ),
    "learn": (
        "Federated rounds (docs/learning.md): whether this device trains when the endpoint "
        "selects it, on how many of its recent normal windows, within what memory."
    ),
    "routing": (
        "Where inference runs: which alerts the endpoint's full-precision model validates, and "
        "cloud inference (agent/sync/routing.py); used with `[uplink]` and `[detect]`."
    ),
    "link": (
        "The link monitor: thresholds of its classification (high, medium, low, offline), "
        "probing, and one table of policy per state (docs/link.md); used with `[uplink]`."
    ),
    "data": (
        "What of each channel leaves the device (agent/sync/datapolicy.py, docs/protocol.md "
        "'Features records'): `raw`, windowed `features`, `local` (the detector only) or `drop`."
    ),
    "data.high": _DATA.format(state="high"),
    "data.medium": _DATA.format(state="medium"),
    "data.low": _DATA.format(state="low"),
    "data.offline": _DATA.format(state="offline"),
    "link.high": _POLICY.format(state="high"),
    "link.medium": _POLICY.format(state="medium"),
    "link.low": _POLICY.format(state="low"),
    "link.offline": _POLICY.format(state="offline"),
    "simulation": (
        'The simulated rig behind sensors on `bus = "sim"` or `port = "sim:NAME"` '
        "(`--simulate` on the command line makes one for every sensor)."
    ),
    "simulation.event[]": 'A fault the synthetic pump develops (`source = "pump"`).',
    "sensor[]": (
        "One part on the bus or one serial instrument. At least one is required; names and "
        "bus/address (or port) pairs must be unique."
    ),
    "sensor[].signals": (
        "Simulation only: the physical signal (a SKAB column name) behind each channel; ignored "
        "on real hardware. `[detect]` also reads its inputs from here."
    ),
    "sensor[].resolution": (
        "The smallest step of a channel in its unit, when the driver's own figure does not fit "
        "(the compact encodings send integer multiples of it)."
    ),
    "sensor[].scaling": (
        "Linear transducers: each entry makes a channel from one of the part's channels through "
        "two points."
    ),
    "sensor[].scaling.<>": "One scaled channel (it must be listed in `channels`).",
    "sensor[].options@adxl345": (
        "ADXL345 accelerometer (drivers/adxl345.py): channels vibration_rms_g, x_g, y_g, z_g."
    ),
    "sensor[].options@ina219": (
        "INA219 current and power monitor (drivers/ina219.py): channels bus_voltage_v, "
        "shunt_voltage_v, current_a, power_w."
    ),
    "sensor[].options@ads1115": (
        "ADS1115 16-bit ADC (drivers/ads1115.py): channels ain0_v to ain3_v, single-ended."
    ),
    "sensor[].options@mcp9600": (
        "MCP9600 thermocouple converter (drivers/mcp9600.py): channels hot_junction_c, "
        "cold_junction_c, delta_c."
    ),
    "sensor[].options@bme280": (
        "BME280 environmental sensor (drivers/bme280.py): channels temperature_c, humidity_rh, "
        "pressure_hpa."
    ),
    "sensor[].options@modbus": (
        "Modbus RTU instrument on a serial port (drivers/modbus.py): one channel per register."
    ),
    "sensor[].options@modbus.identity": (
        "A register that must hold a known value when the instrument is opened (optional)."
    ),
    "sensor[].options@modbus.register[]": "One channel read from one or two registers.",
    "sensor[].options@line": (
        "A serial instrument that sends `key=value` lines, optionally with an NMEA-style XOR "
        "checksum (drivers/line.py)."
    ),
    "sensor[].options@line.rename": "Channel names for keys as they come on the wire.",
    "sensor[].options@line.resolution": "The smallest step of a channel in its unit.",
    "detect": (
        "On-device anomaly detection: the int8 TFLite autoencoder on one row of the model's "
        "channels per period, the fault classifier, the lightweight tier and the PCA novelty "
        "detector (agent/detect/). Without this table the agent samples and syncs only."
    ),
    "detect.inputs": (
        'Where each model channel comes from, as `"sensor/channel"`; by default the sensor '
        "channel whose `[sensor.signals]` entry names it."
    ),
    "detect.novelty": "The PCA T²+Q novelty detector beside the models (agent/detect/novelty.py).",
}

KEYS: dict[str, str] = {
    # [agent]
    "agent.device_id": (
        "The device's name at the endpoint (a letter, then letters, digits, `_ - .`; 63 at "
        "most); its credential is issued for it."
    ),
    "agent.data_dir": (
        "Where the agent keeps its queue, state, models, metrics and status socket; created at "
        "start, and it must be writable by the agent's user."
    ),
    "agent.log_level": "Lowest level logged (one line per event, `key=value`).",
    "agent.cpu_affinity": (
        '`"single"` pins the process to one CPU (the alert path\'s tail latency); `"all"` '
        "leaves it to the scheduler."
    ),
    # [store]
    "store.path": "The queue file; relative to data_dir.",
    "store.budget_mb": (
        "Disk the queue may use; when full, the oldest telemetry goes first, alerts last."
    ),
    "store.durability": (
        '`"full"`: every commit survives a power cut (synchronous=FULL); `"normal"`: faster, '
        "the last commits may be lost."
    ),
    "store.lease_seconds": (
        "How long records handed to the uplink stay reserved before they are sent again."
    ),
    "store.memory_ring": "Alerts held in memory while the disk is full.",
    "store.commit_window": (
        "Seconds readings gather after the first before one commit: fewer writes to flash; a "
        "power cut loses the readings of the open window. 0: each reading as it comes."
    ),
    # [metrics]
    "metrics.textfile": (
        'The `.prom` file, relative to data_dir; `""` turns the metrics file off.'
    ),
    "metrics.interval": "Seconds between rewrites of the file.",
    # [uplink]
    "uplink.endpoints": (
        "Endpoint URIs, tried in order (the later ones are fallbacks of the same deployment): "
        '`coap://HOST:PORT` (or `coap+tcp://`), `coaps://` with `security = "dtls"`.'
    ),
    "uplink.security": (
        '`"oscore"`: every request protected end to end with the credential\'s keys; `"dtls"`: '
        'DTLS 1.2 PSK to `coaps://` endpoints; `"none"`: plain CoAP, unauthenticated (the agent '
        "warns at every start; the endpoint needs `serve --insecure`)."
    ),
    "uplink.credential": (
        "The device's credential file from `edge-agent-cloud devices add ... --credential-out "
        "FILE` (mode 0600); relative to this file. Unset: `credential.json` in data_dir."
    ),
    "uplink.batch_records": "Most records per batch.",
    "uplink.batch_bytes": "Encoded bytes aimed at per batch (the endpoint takes 64 KiB).",
    "uplink.max_inflight": "Most batches in flight at once (the congestion window's ceiling).",
    "uplink.deadline": "Seconds one exchange may take, retransmissions included.",
    "uplink.backoff_base": "First backoff after a failure, seconds (full jitter, doubling).",
    "uplink.backoff_max": "Longest backoff, seconds.",
    "uplink.fallback_after": "Consecutive failures before the next endpoint is tried.",
    "uplink.primary_retry": "Seconds between tries of the first endpoint while on a fallback.",
    # [state]
    "state.report_interval": "A full reported-state PUT at least this often, seconds.",
    "state.min_put_interval": "Changes are coalesced: at most one PUT per this many seconds.",
    "state.deadline": "Seconds one state exchange may take.",
    "state.path": "The state file; relative to data_dir.",
    # [models]
    "models.cache_dir": "The model cache; relative to data_dir.",
    "models.memory_budget_mb": "Memory the loaded models may use (least recently used go first).",
    "models.disk_budget_mb": "Disk the cached model files may use.",
    "models.public_key": (
        "The registry's Ed25519 public key (the KEYFILE.pub of `edge-agent-cloud models "
        "keygen`); relative to this file. Unset, or not there yet: every download is refused."
    ),
    "models.endpoint_path": "The registry's resource path on the endpoint.",
    # [routing]
    "learn.enabled": "Take part in federated rounds when the endpoint selects this device.",
    "learn.windows": (
        "Recent normal windows (model inputs of rows the detector judged normal) kept in memory "
        "to train on."
    ),
    "learn.min_windows": "A round is trained only once this many normal windows are kept.",
    "learn.memory_mb": "Address space of the training process (it fails, the agent does not).",
    "learn.max_lag_ms": (
        "Training pauses (SIGSTOP) while the agent's event loop runs later than this, ms."
    ),
    "learn.epsilon_budget": (
        "The device's differential-privacy budget over every job: a round that would take its "
        "epsilon above this is refused and never trained (docs/learning.md)."
    ),
    "learn.delta": "The delta of the device's (epsilon, delta) privacy guarantee.",
    "update.root": (
        "The release root: releases/<version>, the current and previous links, update.json "
        "(docs/ota.md)."
    ),
    "update.public_key": (
        "The release key's public half (the KEYFILE.pub of `edge-agent-cloud releases keygen`; "
        "not the model key); relative to this file. Until it exists every release is refused."
    ),
    "update.disk_budget_mb": "Data-directory space a downloaded release may take.",
    "update.max_attempts": "Starts of a new release without READY before it is rolled back.",
    "update.health_window_s": (
        "Seconds a new release that runs has to confirm (READY and a sync exchange) before "
        "edge-agent-health.timer rolls it back."
    ),
    "logs.ring_lines": "Log lines kept in memory (the oldest go first).",
    "logs.ring_bytes": "Bytes of log text kept in memory (the oldest lines go first).",
    "routing.confidence_threshold": (
        "Alerts whose confidence is below this are validated by the endpoint (0: never)."
    ),
    "routing.validation_deadline": "Seconds one validation exchange may take.",
    "routing.backoff_base": "First retry delay after a failed validation, seconds.",
    "routing.backoff_max": "Longest retry delay, seconds.",
    "routing.infer_deadline": "Default deadline of one cloud inference, seconds.",
    "routing.cloud_infer": "Allow non-critical inference in the cloud at all.",
    # [link]
    "link.medium_rtt": "Smoothed RTT (s) at which the link is no better than medium.",
    "link.low_rtt": "Smoothed RTT (s) at which it is low; above medium_rtt.",
    "link.medium_loss": "Share of exchanges retransmitted or unanswered for medium.",
    "link.low_loss": "The same for low; above medium_loss.",
    "link.window": "Exchanges over which loss and availability are measured.",
    "link.recover": (
        "A better state needs every measure below recover times its threshold (hysteresis)."
    ),
    "link.hold": "Consecutive evaluations that must agree before the state changes.",
    "link.min_samples": "Exchanges in the window before the state may improve; at most window.",
    "link.offline_failures": (
        "Consecutive exchanges without an answer that, with offline_silence, mean offline."
    ),
    "link.offline_silence": (
        "Seconds since the last answer that, with offline_failures, mean offline."
    ),
    "link.probe_idle": (
        "Probe when no exchange ended for this long, seconds (also the period; offline: the "
        "longest backoff between probes)."
    ),
    "link.probe_timeout": "Deadline of one probe, seconds.",
    "link.initial": "The state assumed at start.",
}

KEYS |= {
    "data.policy": (
        'Channel => `"raw"`, `"features"`, `"local"` or `"drop"`; a key is a channel name (that '
        "channel of every sensor) or `sensor/channel`. Unnamed channels are raw. The channels a "
        "sensor sends are all features or all raw at each link level. A channel made local or "
        "drop: what was queued before leaves without it too. A channel the detector reads may "
        "be local, not drop."
    ),
    "data.window": "Seconds of readings one features record summarizes (windows of the epoch).",
    "data.window_samples": "More than 0: readings per features record instead of `window`.",
    "data.bands": "FFT band energies of each vibration (ADXL345) channel in a features record.",
}

for _state in ("high", "medium", "low", "offline"):
    KEYS |= {
        f"data.{_state}.policy": (
            f'Channel => `"raw"` or `"features"` while the link is {_state}, over `[data]`.'
        )
    }
    KEYS |= {
        f"link.{_state}.content_format": (
            "The batches' encoding: 112 SenML-CBOR, 65000 compact, 65001 compact+deflate, "
            "65002 compact+deflate with the preset dictionary."
        ),
        f"link.{_state}.max_inflight": "Most batches in flight; unset: the uplink's max_inflight.",
        f"link.{_state}.batch_bytes": "Encoded bytes per batch.",
        f"link.{_state}.batch_records": "Most records per batch.",
        f"link.{_state}.send": "false: send nothing, keep everything queued.",
        f"link.{_state}.model": "The detector's tier: the full model or the lightweight one.",
        f"link.{_state}.cloud_validation": "Whether unsure alerts are validated by the endpoint.",
    }

KEYS |= {
    # [simulation]
    "simulation.source": (
        '`"pump"`: the synthetic pump model; `"skab"`: a replay of a SKAB CSV file.'
    ),
    "simulation.file": 'The SKAB CSV to replay (required with `source = "skab"`).',
    "simulation.loop": "Start the replay again at the end of the file.",
    "simulation.seed": "Seed of the synthetic pump's noise.",
    "simulation.event[].fault": "The fault.",
    "simulation.event[].at": "Seconds after start when it begins.",
    "simulation.event[].ramp": "Seconds it takes to reach full severity.",
    "simulation.event[].duration": "Seconds it lasts.",
    "simulation.event[].severity": "How far it goes, 0 to 1.",
    # [[sensor]]
    "sensor[].name": "The sensor's name in readings, status and `[detect.inputs]`.",
    "sensor[].driver": (
        "The part: adxl345, ina219, ads1115, mcp9600, bme280 (I2C), modbus, line (serial)."
    ),
    "sensor[].interval": "Seconds between reads.",
    "sensor[].required": (
        "A required sensor that fails makes `selftest` fail; false: a warning only."
    ),
    "sensor[].bus": 'I2C parts: the bus number (`/dev/i2c-N`), or `"sim"`.',
    "sensor[].address": "I2C parts: the 7-bit address (`0x48` or 72), one the part can take.",
    "sensor[].port": (
        "Serial instruments (required for them, refused for I2C parts): a device path such as "
        "`/dev/ttyUSB0`, or a pyserial URL; one port per sensor (a path and a link to it, such "
        "as `/dev/serial/by-id/...`, are one port)."
    ),
    "sensor[].baudrate": "Serial instruments: the line speed.",
    "sensor[].framing": (
        'Serial instruments: data bits (7, 8), parity (N, E, O), stop bits (1, 2); "8E1" is '
        "the Modbus RTU default."
    ),
    "sensor[].channels": (
        "The channels reported: the part's own, or scaled ones from `[sensor.scaling]`."
    ),
    "sensor[].signals.<>": 'The signal\'s name (a SKAB column, e.g. `"Accelerometer1RMS"`).',
    "sensor[].resolution.<>": "The step, in the channel's unit.",
    "sensor[].scaling.<>.source": "The part's channel it is made from.",
    "sensor[].scaling.<>.in": "Two values of the source channel ...",
    "sensor[].scaling.<>.out": "... and the two values they mean.",
    "sensor[].scaling.<>.unit": "The unit, for display.",
    # ADXL345
    "sensor[].options@adxl345.range_g": "Full scale, ±g.",
    "sensor[].options@adxl345.full_resolution": (
        "true: 3.9 mg per LSB at every range; false: 10-bit words."
    ),
    "sensor[].options@adxl345.data_rate_hz": (
        "Output data rate. The 32-sample FIFO is drained every 16 samples, so a drain may come "
        "up to 16 sample periods late before samples are lost ('fifo overrun' warnings): 40 ms "
        "at 400 Hz (the reference rig), 20 ms at 800 Hz, 5 ms at 3200 Hz."
    ),
    "sensor[].options@adxl345.window": (
        "Samples per reading (the RMS window), a multiple of 32; window / data_rate_hz seconds "
        "must fit in the interval."
    ),
    # INA219
    "sensor[].options@ina219.shunt_ohms": "The shunt resistor, ohms.",
    "sensor[].options@ina219.max_current_a": (
        "Largest expected current, A: sets the calibration register and the current LSB."
    ),
    "sensor[].options@ina219.bus_range_v": "Bus voltage range, V.",
    "sensor[].options@ina219.pga": (
        'Shunt voltage full scale, mV; `"auto"`: the smallest that fits max_current_a.'
    ),
    "sensor[].options@ina219.adc_bits": "ADC resolution of one sample.",
    "sensor[].options@ina219.samples": "Samples averaged per conversion (needs adc_bits = 12).",
    "sensor[].options@ina219.mode": ('`"continuous"` conversions, or `"triggered"`: one per read.'),
    # ADS1115
    "sensor[].options@ads1115.pga": "Full scale, V.",
    "sensor[].options@ads1115.data_rate": "Samples per second of a conversion.",
    "sensor[].options@ads1115.inputs": "The inputs read, 0 to 3.",
    # MCP9600
    "sensor[].options@mcp9600.thermocouple": "The thermocouple type.",
    "sensor[].options@mcp9600.filter": "The part's digital filter coefficient (0: off).",
    "sensor[].options@mcp9600.adc_bits": "ADC resolution (more bits, slower conversions).",
    "sensor[].options@mcp9600.cold_junction_resolution": (
        "Resolution of the cold-junction sensor, °C."
    ),
    # BME280
    "sensor[].options@bme280.mode": (
        '`"forced"`: one conversion per read, the part sleeps in between; `"normal"`: '
        "continuous conversions."
    ),
    "sensor[].options@bme280.oversampling_t": "Temperature oversampling (0: skipped).",
    "sensor[].options@bme280.oversampling_p": "Pressure oversampling (0: skipped).",
    "sensor[].options@bme280.oversampling_h": "Humidity oversampling (0: skipped).",
    "sensor[].options@bme280.iir_filter": "IIR filter coefficient (0: off).",
    "sensor[].options@bme280.standby_ms": "Standby between conversions in normal mode, ms.",
    # Modbus
    "sensor[].options@modbus.slave": "The instrument's slave address.",
    "sensor[].options@modbus.timeout": "Seconds to wait for an answer.",
    "sensor[].options@modbus.retries": (
        "Repeats of a request that got no answer, a garbled one or SERVER DEVICE BUSY."
    ),
    "sensor[].options@modbus.max_registers": "Most registers per request.",
    "sensor[].options@modbus.word_order": (
        "Order of the two registers of 32-bit values, for every register unless it says."
    ),
    "sensor[].options@modbus.identity.table": "The register's table.",
    "sensor[].options@modbus.identity.address": "Its address.",
    "sensor[].options@modbus.identity.value": "The value it must hold.",
    "sensor[].options@modbus.register[].name": "The channel's name.",
    "sensor[].options@modbus.register[].table": "Holding or input registers.",
    "sensor[].options@modbus.register[].address": "The (first) register's address.",
    "sensor[].options@modbus.register[].type": "How the register(s) are read (32-bit: two).",
    "sensor[].options@modbus.register[].scale": "value = raw * scale + offset.",
    "sensor[].options@modbus.register[].offset": "See scale.",
    "sensor[].options@modbus.register[].word_order": "This register's word order.",
    "sensor[].options@modbus.register[].resolution": (
        "float32 only: the channel's step; an integer register's is |scale|."
    ),
    # line
    "sensor[].options@line.keys": (
        "The keys reported, in order, each a channel: a wire key or the name it is renamed to."
    ),
    "sensor[].options@line.rename.<>": "The channel name of this wire key.",
    "sensor[].options@line.checksum": (
        '`"xor"`: a `*HH` checksum is required and checked; `"optional"`: checked when '
        'present; `"none"`: ignored.'
    ),
    "sensor[].options@line.mode": (
        '`"poll"`: a read sends command and reads one line; `"stream"`: the instrument sends '
        "lines by itself, a read takes the newest."
    ),
    "sensor[].options@line.command": "The poll command (poll mode only).",
    "sensor[].options@line.period": (
        "The instrument's streaming period, seconds (stream mode only)."
    ),
    "sensor[].options@line.timeout": (
        "Seconds to wait for a line; default 1 in poll mode, three periods in stream mode "
        "(where it must exceed two)."
    ),
    "sensor[].options@line.resolution.<>": "The step, in the channel's unit (default 0.01).",
    # [detect]
    "detect.period": "Seconds between rows scored.",
    "detect.max_age": (
        "Oldest reading (s) a row may use; unset: the longer of three periods and two "
        "intervals of the slowest input plus one period."
    ),
    "detect.lite_model": 'The lightweight tier\'s model (`""`: no lightweight tier).',
    "detect.tier": "The tier at start (the link policy switches it later).",
    "detect.inputs.<>": '`"sensor/channel"` that feeds this model channel.',
    "detect.models_dir": (
        "Directory of the models and their manifest.json; relative to this file. Unset: the "
        "shipped models."
    ),
    "detect.model": "The anomaly model (an entry of the manifest).",
    "detect.classifier": 'The fault classifier (`""`: none).',
    "detect.runtime": "The TFLite runtime: ai-edge-litert, tflite-runtime, or the first found.",
    "detect.num_threads": "Interpreter threads.",
    "detect.batch_mode": (
        '`"resize"`: a backlog is scored in one invoke; `"loop"`: one invoke per window.'
    ),
    "detect.threshold": "Anomaly score threshold; unset: the model manifest's.",
    "detect.change_alerts": (
        "Send each changepoint the detector finds (the process changed; docs/detection.md) as "
        "an alert of kind `change`."
    ),
    "detect.raise_after": "Rows above the threshold before an alert; unset: the manifest's.",
    "detect.clear_after": "Rows below it before the alert clears; unset: the manifest's.",
    "detect.commissioning_samples": (
        "Rows of normal running that calibrate the detector on this device before it scores; "
        "unset: the manifest's (400)."
    ),
    "detect.classifier_confidence": (
        "At or above it the verdict is known_failure with its class; below, novel_anomaly."
    ),
    "detect.top_channels": "Channels an alert names, largest residual first.",
    "detect.track_samples": (
        "Time constant, in rows, of the slow tracking of the normal reference (0: off)."
    ),
    "detect.novelty.enabled": "Run the novelty detector.",
    "detect.novelty.variance": "Share of the variance the PCA model keeps.",
    "detect.novelty.alpha": "Confidence of the T² and Q limits.",
    "detect.novelty.min_samples": "Normal rows needed before the first fit.",
    "detect.novelty.buffer": "Normal rows of recent history kept.",
    "detect.novelty.retrain_every": "Refit after this many new normal rows.",
}
