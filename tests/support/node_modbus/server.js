// npm modbus-serial's ServerSerial as Modbus RTU devices on one serial line (a pty in tests),
// started by tests/support/rtu_peer.py as `node server.js --path /dev/pts/N --units 1,2`.
// Holding register k of unit u holds u * 100 + k; a unit not listed never answers (as on a
// real bus: the callback is simply never called). Prints {"ready": path} once the port is open.
"use strict";

const ModbusRTU = require("modbus-serial");

function arg(name, fallback) {
    const i = process.argv.indexOf(`--${name}`);
    return i >= 0 ? process.argv[i + 1] : fallback;
}

const path = arg("path");
const units = new Set(arg("units", "1").split(",").map((u) => parseInt(u, 10)));

function register(addr, unitID, callback) {
    if (!units.has(unitID)) {
        return; // silence
    }
    callback(null, unitID * 100 + addr);
}

const vector = {
    getHoldingRegister: register,
    getInputRegister: register,
    getCoil: (addr, unitID, callback) => {
        if (units.has(unitID)) callback(null, addr % 2 === 1);
    },
    getDiscreteInput: (addr, unitID, callback) => {
        if (units.has(unitID)) callback(null, addr % 2 === 1);
    },
};

const server = new ModbusRTU.ServerSerial(vector, {
    path, baudRate: 115200, dataBits: 8, parity: "none", stopBits: 1, unitID: 255,
}, { debug: false });

server.on("initialized", () => process.stdout.write(JSON.stringify({ ready: path }) + "\n"));
server.on("error", (err) => {
    process.stderr.write(String(err && err.stack || err) + "\n");
    process.exit(1);
});
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
process.on("SIGTERM", () => process.exit(0));
