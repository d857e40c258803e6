"""Modbus TCP source."""
